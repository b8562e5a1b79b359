//! The durable history (`--data-dir`): a restart, even a crash, loses no answered publish;
//! a locked, damaged or full store is refused or reported, never silently lost.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{take_data, temp_dir, TestHub};
use http::StatusCode;
use ssehub::client::EventStream;

fn arg(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

/// Every event until none arrives for `quiet`: (id, data).
async fn drain(stream: &mut EventStream, quiet: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Ok(next) = tokio::time::timeout(quiet, stream.next()).await {
        match next {
            Ok(Some(e)) => out.push((e.id, e.data)),
            _ => break,
        }
    }
    out
}

/// SIGKILL under a steady load from two publishers; after the restart, a subscriber resuming
/// from before the crash gets every update that was answered 200, once, in each publisher's
/// order (updates never answered may be there, never twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_no_answered_publish() {
    let dir = temp_dir();
    let hub = TestHub::start_process(&["--data-dir", arg(&dir)]);
    let mut load = Vec::new();
    for p in 0..2 {
        let mut publisher = hub.publisher().await;
        load.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0.. {
                let data = format!("p{p}-{i}");
                let fields = [("topic", "t"), ("data", data.as_str())];
                let token = publisher.token.clone();
                match publisher.conn.publish(Some(&token), &fields).await {
                    Ok((StatusCode::OK, id)) => answered.push((id, data)),
                    // The hub died under the request: never answered.
                    _ => break,
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hub.signal("KILL");
    let mut answered = Vec::new();
    for l in load {
        answered.push(l.await.unwrap());
    }
    drop(hub);
    assert!(answered.iter().all(|a| a.len() > 10), "too little load");

    let hub = TestHub::start_process(&["--data-dir", arg(&dir)]);
    let (from, _) = answered[0][4].clone();
    let mut s = hub.subscribe("topic=t", &[("Last-Event-ID", &from)]).await;
    assert_eq!(s.headers["last-event-id"], from.as_str());
    let got = drain(&mut s, Duration::from_secs(2)).await;
    let mut ids: Vec<_> = got.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), got.len(), "an update came twice");
    for (p, mine) in answered.iter().enumerate() {
        let prefix = format!("p{p}-");
        let received: Vec<_> = got
            .iter()
            .filter(|(_, d)| d.starts_with(&prefix))
            .map(|(id, _)| id)
            .collect();
        // Each publisher's seqs go up: what it had after the resume point is a suffix of what
        // it was answered (for publisher 0, from its 6th), each in the replay in order, with
        // at most updates never answered after them.
        let first = match p {
            0 => 5,
            _ => mine
                .iter()
                .position(|(id, _)| Some(&id) == received.first())
                .expect("the other publisher's updates after the resume point"),
        };
        let expected: Vec<_> = mine[first..].iter().map(|(id, _)| id).collect();
        assert_eq!(
            received[..expected.len()],
            expected[..],
            "publisher {p}: answered updates lost or out of order"
        );
        assert!(
            received.len() <= expected.len() + 1,
            "at most one never answered"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// After a restart, an id older than the history kept gets `earliest` and all of it; ids go
/// on after the restart as before it.
#[tokio::test]
async fn a_restart_keeps_the_history_and_its_earliest_rule() {
    let dir = temp_dir();
    let args = ["--data-dir", arg(&dir), "--history-size", "5"];
    let hub = TestHub::start_process(&args);
    let mut p = hub.publisher().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(p.ok(&[("topic", "t"), ("data", &format!("m{i}"))]).await);
    }
    hub.terminate();
    drop(p);
    drop(hub);

    let hub = TestHub::start_process(&args);
    let mut s = hub
        .subscribe("topic=t", &[("Last-Event-ID", &ids[0])])
        .await;
    assert_eq!(s.headers["last-event-id"], "earliest");
    assert_eq!(take_data(&mut s, 5).await, ["m5", "m6", "m7", "m8", "m9"]);
    let mut resumed = hub
        .subscribe("topic=t", &[("Last-Event-ID", &ids[8])])
        .await;
    assert_eq!(resumed.headers["last-event-id"], ids[8].as_str());
    assert_eq!(take_data(&mut resumed, 1).await, ["m9"]);
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "t"), ("data", "after")]).await;
    assert_eq!(take_data(&mut s, 1).await, ["after"]);
    assert_eq!(take_data(&mut resumed, 1).await, ["after"]);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

fn serve(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--clock-interval", "0"])
        .args(["--data-dir", arg(dir)])
        .args(extra)
        .env_remove("SSEHUB_DATA_DIR")
        .output()
        .unwrap()
}

#[test]
fn a_second_hub_on_the_same_directory_exits() {
    let dir = temp_dir();
    let _first = TestHub::start(&["--data-dir", arg(&dir)]);
    let out = serve(&dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("another ssehub is using {}", dir.display()))
            && err.contains("choose another --data-dir"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_damaged_store_is_refused_and_moved_aside_only_when_asked() {
    for damage in ["garbage", "truncated"] {
        let dir = temp_dir();
        {
            let hub = TestHub::start(&["--data-dir", arg(&dir)]);
            let mut p = hub.publisher().await;
            p.ok(&[("topic", "t"), ("data", "x")]).await;
        }
        let file = dir.join(ssehub::hub::store::FILE);
        let bytes = std::fs::read(&file).unwrap();
        match damage {
            "garbage" => std::fs::write(&file, vec![0x5a; bytes.len()]).unwrap(),
            _ => std::fs::write(&file, &bytes[..100]).unwrap(),
        }
        let out = serve(&dir, &[]);
        assert_eq!(out.status.code(), Some(1), "{damage}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("is damaged") && err.contains("--data-dir-recover"),
            "{damage}: {err}"
        );
        assert!(file.exists(), "left where it was");

        let hub = TestHub::start(&["--data-dir", arg(&dir), "--data-dir-recover"]);
        assert!(hub.wait_for_log("moved it aside", Duration::from_secs(5)));
        let aside: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.to_string_lossy()
                    .starts_with(&format!("{}.corrupt-", dir.display()))
            })
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let mut p = hub.publisher().await;
        p.ok(&[("topic", "t"), ("data", "y")]).await;
        drop(hub);
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&aside[0]);
    }
}

/// Writes that fail (the file-size limit reached: EFBIG) refuse those publishes with 503 and
/// the reason; subscribers get exactly what was answered 200; publishing resumes once the
/// limit is raised.
#[tokio::test]
async fn a_failed_write_refuses_the_publish_and_nothing_else() {
    let dir = temp_dir();
    let hub = TestHub::start_with_file_size(&["--data-dir", arg(&dir)], 1 << 20);
    let mut s = hub.subscribe("topic=t", &[]).await;
    let mut p = hub.publisher().await;
    let big = "x".repeat(60_000);
    let mut accepted = 0;
    let refusal = loop {
        let data = format!("{accepted} {big}");
        let (status, body) = p.publish(&[("topic", "t"), ("data", &data)]).await;
        match status {
            StatusCode::OK => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => break body,
            other => panic!("{other}: {body}"),
        }
        assert!(accepted < 100, "the limit never bit");
    };
    assert!(
        refusal.contains("could not be written to the history store")
            && refusal.to_lowercase().contains("file too large"),
        "{refusal}"
    );
    let got = take_data(&mut s, accepted).await;
    for (i, d) in got.iter().enumerate() {
        assert!(d.starts_with(&format!("{i} ")), "{i}");
    }
    common::assert_quiet(&mut s, Duration::from_millis(300)).await;
    // Still serving subscribers, with the replay of what was stored.
    let mut late = hub
        .subscribe("topic=t", &[("Last-Event-ID", "earliest")])
        .await;
    assert_eq!(take_data(&mut late, accepted).await.len(), accepted);

    let ok = Command::new("prlimit")
        .args(["--pid", &hub.pid().to_string(), "--fsize=unlimited"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "prlimit");
    p.ok(&[("topic", "t"), ("data", "again")]).await;
    assert_eq!(take_data(&mut s, 1).await, ["again"]);
    assert_eq!(take_data(&mut late, 1).await, ["again"]);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A publisher's private update on a topic that only looks like the hub's reserved namespace
/// (it leaves it through dot segments, so the publish check lets it through) is a publisher's
/// update like any other: answered once on disk, there after a restart. Today the hub files
/// it as one of its own subscription events (a prefix test on the raw topic), so it is
/// answered 200 with an id, never written, and gone after the restart (it also skips the
/// writer queue's budget, and, in the history, the subscription events' partition).
#[tokio::test]
async fn a_topic_leaving_the_reserved_namespace_is_stored_like_any_other() {
    let dir = temp_dir();
    let args = ["--data-dir", arg(&dir)];
    let hub = TestHub::start_process(&args);
    let mut p = hub.publisher().await;
    let topic = "/.well-known/mercure/subscriptions/../../x";
    p.ok(&[("topic", "t"), ("data", "plain"), ("private", "on")])
        .await;
    p.ok(&[("topic", topic), ("data", "dotted"), ("private", "on")])
        .await;
    hub.terminate();
    drop(p);
    drop(hub);

    let hub = TestHub::start_process(&args);
    let all = ["*".to_owned()];
    let token = hub.key.mint(None, Some(&all), None).unwrap();
    let bearer = format!("Bearer {token}");
    let mut s = hub
        .subscribe(
            "topic=*&lastEventID=earliest",
            &[("authorization", &bearer)],
        )
        .await;
    let got = drain(&mut s, Duration::from_secs(1)).await;
    let data: Vec<_> = got.iter().map(|(_, d)| d.as_str()).collect();
    assert!(data.contains(&"plain"), "{data:?}");
    assert!(
        data.contains(&"dotted"),
        "an answered publish was lost: {data:?}"
    );
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small tmpfs mounted for one test, unmounted (lazily, even if the hub still holds it)
/// when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` after a loud SKIP where this process may not mount (it needs root with
    /// CAP_SYS_ADMIN, which a CI container may not grant; nothing to install would help).
    fn mount(bytes: u64) -> Option<SmallDisk> {
        let dir = temp_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "tmpfs",
                arg(&dir),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): the disk-full test \
                 did not run"
            );
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", arg(&self.0)]).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The disk fills up: the publish that does not fit gets 503 with the reason, subscribers keep
/// their streams and everything answered before; once space returns the next publish is
/// stored; and after a restart the store holds exactly what was answered 200, nothing of the
/// refused one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_publish_and_publishing_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount(4 << 20) else {
        return;
    };
    let data_dir = disk.0.join("data");
    let args = ["--data-dir", arg(&data_dir), "--history-size", "1000"];
    let hub = TestHub::start_process(&args);
    // Leave about a megabyte free (whatever the hub's files took): fill the disk, then give
    // a megabyte back.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(1 << 20)).unwrap();
    }
    let mut s = hub.subscribe("topic=t", &[]).await;
    let mut p = hub.publisher().await;
    let big = "x".repeat(60_000);
    let mut accepted = 0;
    let refusal = loop {
        let data = format!("{accepted} {big}");
        let (status, body) = p.publish(&[("topic", "t"), ("data", &data)]).await;
        match status {
            StatusCode::OK => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => break body,
            other => panic!("{other}: {body}"),
        }
        assert!(accepted < 100, "the disk never filled");
    };
    assert!(accepted > 0, "nothing fitted: {refusal}");
    assert!(
        refusal.contains("could not be written to the history store")
            && refusal.to_lowercase().contains("no space"),
        "{refusal}"
    );
    let got = take_data(&mut s, accepted).await;
    for (i, d) in got.iter().enumerate() {
        assert!(d.starts_with(&format!("{i} ")), "{i}");
    }
    common::assert_quiet(&mut s, Duration::from_millis(300)).await;

    std::fs::remove_file(&filler).unwrap();
    p.ok(&[("topic", "t"), ("data", "again")]).await;
    assert_eq!(take_data(&mut s, 1).await, ["again"]);

    hub.terminate();
    drop((p, s));
    drop(hub);
    let hub = TestHub::start_process(&args);
    let mut replay = hub
        .subscribe("topic=t", &[("Last-Event-ID", "earliest")])
        .await;
    let data = take_data(&mut replay, accepted + 1).await;
    common::assert_quiet(&mut replay, Duration::from_millis(500)).await;
    assert_eq!(
        data.len(),
        accepted + 1,
        "what was answered 200, and only that"
    );
    for (i, d) in data[..accepted].iter().enumerate() {
        assert!(d.starts_with(&format!("{i} ")), "{i}");
    }
    assert_eq!(data[accepted], "again");
    drop(hub);
}

/// A clean stop (SIGTERM) finishes the store's writes and closes its file, so the next start
/// opens it at once; after a SIGKILL the next start says it checks the file first, and both
/// keep every update.
#[tokio::test]
async fn a_clean_stop_closes_the_store_and_a_crash_is_checked_at_the_next_start() {
    let dir = temp_dir();
    let args = ["--data-dir", arg(&dir)];
    let unclean = "not closed cleanly";
    let mut hub = TestHub::start_process(&args);
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "one")])
        .await;
    hub.terminate();
    let status = hub.wait_exit(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    // The log's last lines may still be on their way from the pipe.
    assert!(
        hub.wait_for_log("the history store is closed", Duration::from_secs(10)),
        "{:?}",
        hub.logs()
    );
    drop(hub);

    let mut hub = TestHub::start_process(&args);
    assert!(
        !hub.logs().iter().any(|l| l.contains(unclean)),
        "{:?}",
        hub.logs()
    );
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "two")])
        .await;
    hub.signal("KILL");
    assert!(hub.wait_exit(Duration::from_secs(15)).is_some());
    drop(hub);

    let hub = TestHub::start_process(&args);
    assert!(
        hub.logs().iter().any(|l| l.contains(unclean)),
        "{:?}",
        hub.logs()
    );
    let mut replay = hub
        .subscribe("topic=t", &[("Last-Event-ID", "earliest")])
        .await;
    assert_eq!(take_data(&mut replay, 2).await, ["one", "two"]);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hub's log (`DIR/history.log`): a SIGKILL after publishes that only the log holds (the
/// next checkpoint into redb is a megabyte away) loses none of them, and a torn frame after
/// them (a crash in the middle of a write that was never answered) is cut, not read, and
/// written over by the next publish.
#[tokio::test]
async fn a_kill_before_the_checkpoint_loses_nothing_and_a_torn_tail_is_cut() {
    let dir = temp_dir();
    let args = ["--data-dir", arg(&dir)];
    let hub = TestHub::start_process(&args);
    let mut p = hub.publisher().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(p.ok(&[("topic", "t"), ("data", &format!("m{i}"))]).await);
    }
    hub.signal("KILL");
    drop(p);
    drop(hub);

    // The frames end where the log's zeros begin; what a torn write leaves goes right after:
    // the head of a frame of this lap (the first frame's) with a body that never landed.
    let log = dir.join("history.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .expect("frames in the log")
        + 1;
    let torn: Vec<u8> = bytes[..20].iter().chain(b"never landed").copied().collect();
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    std::fs::write(&log, &bytes).unwrap();

    let hub = TestHub::start_process(&args);
    let mut s = hub
        .subscribe("topic=t", &[("Last-Event-ID", "earliest")])
        .await;
    let got = drain(&mut s, Duration::from_millis(500)).await;
    let want: Vec<_> = (0..5).map(|i| (ids[i].clone(), format!("m{i}"))).collect();
    assert_eq!(
        got, want,
        "every answered publish, once, in order, nothing else"
    );
    // The cut is said, with what its head claimed (the first frame's length and head).
    let claimed = 20 + u32::from_le_bytes(bytes[..4].try_into().unwrap());
    let said = format!("cut {claimed} bytes at byte {end}");
    assert!(
        hub.wait_for_log(&said, Duration::from_secs(5)),
        "no `{said}` in {:?}",
        hub.logs()
    );
    let mut p = hub.publisher().await;
    let after = p.ok(&[("topic", "t"), ("data", "after")]).await;
    hub.signal("KILL");
    drop((p, s));
    drop(hub);

    let hub = TestHub::start_process(&args);
    let mut s = hub
        .subscribe("topic=t", &[("Last-Event-ID", &ids[4])])
        .await;
    assert_eq!(s.headers["last-event-id"], ids[4].as_str());
    let got = drain(&mut s, Duration::from_millis(500)).await;
    assert_eq!(got, [(after, "after".to_owned())]);
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}
