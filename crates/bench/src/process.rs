//! What the kernel says a process costs: CPU time from `/proc/PID/stat`, resident memory
//! from `/proc/PID/status` and open file descriptors from `/proc/PID/fd`. Read for the server
//! (possibly several processes, such as nginx's workers) and for the bench itself, so that
//! deliveries can be counted per CPU-second and a soak can show whether anything leaks.

/// Clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on every Linux architecture
/// that ssehub runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// A process to watch: a pid, or the bench itself.
#[derive(Debug, Clone, Copy)]
pub enum Proc {
    Pid(u32),
    SelfProc,
}

impl Proc {
    fn dir(self) -> String {
        match self {
            Proc::Pid(p) => format!("/proc/{p}"),
            Proc::SelfProc => "/proc/self".to_owned(),
        }
    }

    /// User plus system CPU seconds used so far.
    pub fn cpu_secs(self) -> std::io::Result<f64> {
        let stat = std::fs::read_to_string(format!("{}/stat", self.dir()))?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3 of the man page, utime 14 and stime 15.
        let field =
            |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
        Ok((field(14) + field(15)) as f64 / TICKS_PER_SEC)
    }

    /// Whether the process still runs: its stat readable, and not a zombie waiting for its
    /// parent (state `Z` or `X`).
    pub fn alive(self) -> bool {
        std::fs::read_to_string(format!("{}/stat", self.dir())).is_ok_and(|stat| {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        })
    }

    /// Resident set size in KiB.
    pub fn rss_kib(self) -> std::io::Result<u64> {
        let status = std::fs::read_to_string(format!("{}/status", self.dir()))?;
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0))
    }

    /// Open file descriptors (sockets included): the entries of `/proc/PID/fd`.
    pub fn open_fds(self) -> std::io::Result<u64> {
        Ok(std::fs::read_dir(format!("{}/fd", self.dir()))?.count() as u64)
    }
}

/// A set of server processes, summed.
#[derive(Debug, Clone)]
pub struct Server(pub Vec<u32>);

impl Server {
    pub fn cpu_secs(&self) -> f64 {
        self.0
            .iter()
            .filter_map(|&p| Proc::Pid(p).cpu_secs().ok())
            .sum()
    }

    /// The pids that cannot be read any more (the process exited).
    pub fn gone(&self) -> Vec<u32> {
        self.0
            .iter()
            .copied()
            .filter(|&p| !Proc::Pid(p).alive())
            .collect()
    }

    pub fn rss_kib(&self) -> u64 {
        self.0
            .iter()
            .filter_map(|&p| Proc::Pid(p).rss_kib().ok())
            .sum()
    }

    pub fn open_fds(&self) -> u64 {
        self.0
            .iter()
            .filter_map(|&p| Proc::Pid(p).open_fds().ok())
            .sum()
    }

    /// Checks that every pid can be read, so a typo fails before the run rather than after.
    pub fn check(&self) -> anyhow::Result<()> {
        for &p in &self.0 {
            Proc::Pid(p).cpu_secs().map_err(|e| {
                anyhow::anyhow!(
                    "cannot read /proc/{p}/stat ({e}): is --pid the server's process id?"
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_itself() {
        assert!(Proc::SelfProc.rss_kib().unwrap() > 0);
        assert!(Proc::SelfProc.cpu_secs().unwrap() >= 0.0);
        // The directory being listed is itself open while it is read.
        assert!(Proc::SelfProc.open_fds().unwrap() > 0);
    }
}
