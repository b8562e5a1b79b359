//! The README's commands work as written: every ```sh block marked `<!-- run -->` (or
//! `<!-- run: hub -->` for the one that starts the hub in the background) runs, in order, in
//! one bash session against the built `ssehub`, on a free port instead of 8000. Each must
//! succeed, and a block followed by a plain ``` block must print those lines, in order (`…`
//! stands for any text). Blocks that cannot run here (the browser's, installing) carry no mark.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The whole session may take this long; the commands themselves take about a second.
const WITHIN: Duration = Duration::from_secs(90);

struct Block {
    code: String,
    starts_hub: bool,
    expected: Vec<String>,
}

/// The marked blocks of `text`, each with the output shown right after it, if any.
fn runnable_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let fence_end = |from: usize| {
        (from..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .expect("an unclosed code block in README.md")
    };
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let mark = lines[i].trim();
        let starts_hub = mark == "<!-- run: hub -->";
        if !(starts_hub || mark == "<!-- run -->") {
            i += 1;
            continue;
        }
        assert_eq!(
            lines[i + 1].trim_end(),
            "```sh",
            "a run mark must sit right above a ```sh block"
        );
        let end = fence_end(i + 2);
        let code = lines[i + 2..end].join("\n");
        // The output, when the README shows it: the next block, if nothing but blank lines
        // comes between, and it has no language.
        let mut expected = Vec::new();
        let mut next = end + 1;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        if next < lines.len() && lines[next].trim_end() == "```" {
            let out_end = fence_end(next + 1);
            expected = lines[next + 1..out_end]
                .iter()
                .map(|l| l.trim_end().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            next = out_end + 1;
        }
        blocks.push(Block {
            code,
            starts_hub,
            expected,
        });
        i = next;
    }
    blocks
}

/// Whether `line` matches `pattern`, where `…` in the pattern stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() || !line.ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The README's blocks need bash, curl and openssl. Without one of them the test skips loudly,
/// unless `SSEHUB_REQUIRE_ALL=1` (CI): then it fails.
fn tools_present(test: &str) -> bool {
    let missing: Vec<&str> = ["bash", "curl", "openssl"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!("{} not found on PATH", missing.join(", "));
    if std::env::var("SSEHUB_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!(
            "{test}: {why}, and SSEHUB_REQUIRE_ALL=1 requires them (apt-get install curl openssl)"
        );
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

#[test]
fn readme_blocks_run_as_written() {
    if !tools_present("readme_blocks_run_as_written") {
        return;
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    assert!(
        blocks.iter().filter(|b| b.starts_hub).count() == 1 && blocks.len() >= 3,
        "README.md should mark one block that starts the hub and the blocks that use it"
    );

    // A port free now, for the hub the README starts (it binds the port itself a moment later).
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let address = format!("127.0.0.1:{port}");
    let health = format!("http://{address}/healthz");
    // One session, so that variables carry from block to block; the background hub is
    // stopped however the session ends. Each block's output is told apart by a marker line.
    let mut script =
        String::from("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n");
    for (n, block) in blocks.iter().enumerate() {
        script.push_str(&format!("printf '\\n@@block {n}\\n'\n"));
        // Both spellings of the default address, so that no block reaches a hub this machine
        // may be running on port 8000.
        let code = block
            .code
            .replace("127.0.0.1:8000", &address)
            .replace("localhost:8000", &address);
        script.push_str(&code);
        script.push('\n');
        if block.starts_hub {
            // Wait for the hub to answer (at most 20 s), as a user would before going on. The
            // hub must still be running then: had another process taken the port meanwhile, the
            // hub would have exited and the health check reached that process instead.
            script.push_str(&format!(
                "for _ in $(seq 400); do kill -0 $! || break; curl -fs -o /dev/null {health} && break; sleep 0.05; done\n\
                 kill -0 $! || {{ echo 'the hub of the README is not running' >&2; exit 1; }}\n\
                 curl -fs -o /dev/null {health}\n"
            ));
        }
    }
    script.push_str("printf '\\n@@end\\n'\n");

    let dir = common::temp_dir();
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ssehub"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log_path = dir.join("stderr.log");
    let mut child = {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new("bash");
        // The session runs in a fresh directory (the hub's ssehub-data lands there) and does not
        // see this machine's settings: no SSEHUB_* variable of the caller's, and a home without
        // a ~/.curlrc that could change what curl prints.
        for (name, _) in std::env::vars_os() {
            let name_text = name.to_string_lossy();
            if name_text.starts_with("SSEHUB_") || name_text == "CURL_HOME" {
                command.env_remove(&name);
            }
        }
        command
            .args(["-c", &script])
            .current_dir(&dir)
            .env("HOME", &dir)
            .env_remove("XDG_CONFIG_HOME")
            .env("PATH", path)
            // The hub the README starts listens where the test says; every serve flag has
            // its environment variable, so the README's command stays as written.
            .env("SSEHUB_LISTEN", &address)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let mut stdout = child.stdout.take().unwrap();
    let (done, output) = mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        let _ = done.send(text);
    });
    let stdout = match output.recv_timeout(WITHIN) {
        Ok(text) => text,
        Err(_) => {
            // Stuck: end the whole session (the hub included) and show what it printed.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            output.recv().unwrap_or_default() + "\n(killed: it did not finish in time)"
        }
    };
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
    let context = format!(
        "in {}\nscript:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        dir.display()
    );
    assert!(
        status.success() && stdout.contains("\n@@end\n"),
        "a README block failed ({status})\n{context}"
    );

    for (n, block) in blocks.iter().enumerate() {
        let start = stdout.find(&format!("\n@@block {n}\n")).unwrap();
        let section = stdout[start..].split_once('\n').unwrap().1;
        let section = section.split_once("\n@@block ").map_or(section, |(s, _)| s);
        let section = section.split_once("\n@@end").map_or(section, |(s, _)| s);
        let mut lines = section.lines().map(str::trim_end);
        for want in &block.expected {
            assert!(
                lines.any(|line| matches(want, line)),
                "block {n} did not print `{want}` (in order)\n{}\n{context}",
                block.code
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_patterns() {
    assert!(matches("urn:uuid:…", "urn:uuid:01a2"));
    assert!(matches("a … b", "a x y b"));
    assert!(matches("ok", "ok"));
    assert!(!matches("ok", "ok!"));
    assert!(!matches("urn:uuid:…", "401 Unauthorized"));
    assert!(!matches("a…a", "a"));
}
