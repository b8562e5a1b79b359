//! The flag reference cannot drift from the binary: every long flag `ssehub serve --help`
//! prints must have a row in docs/CONFIGURATION.md with its environment variable, and every
//! flag documented there must still exist. Hidden flags are not printed, so they are not asked for.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// Long flags of `ssehub serve --help`, each with the environment variable clap names for it
/// (`None` for flags without one, such as `--help`).
fn serve_flags() -> BTreeMap<String, Option<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_ssehub"))
        .args(["serve", "--help"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "ssehub serve --help failed: {out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        // A flag's own line is indented and starts with `--name` (or `-h, --name`).
        let flag_start = trimmed
            .strip_prefix("--")
            .or_else(|| trimmed.split_once(", --").map(|(_, rest)| rest));
        if line.starts_with(' ') && trimmed.starts_with('-') {
            if let Some(rest) = flag_start {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                flags.insert(name.clone(), None);
                current = Some(name);
                continue;
            }
        }
        if let (Some(name), Some(env)) = (&current, trimmed.strip_prefix("[env: ")) {
            let var: String = env
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            flags.insert(name.clone(), Some(var));
        }
    }
    assert!(
        flags.contains_key("listen") && flags.contains_key("publisher-jwt-key"),
        "could not read the flags from ssehub serve --help:\n{help}"
    );
    flags
}

/// The rows of the flags table in docs/CONFIGURATION.md: each long flag of a row's first
/// cell, with the row's second cell (its environment variables).
fn documented_flags() -> BTreeMap<String, String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIGURATION.md");
    let text = std::fs::read_to_string(path).unwrap();
    let table = text
        .split_once("\n## Flags\n")
        .expect("docs/CONFIGURATION.md has a `## Flags` section")
        .1;
    let table = table.split("\n## ").next().unwrap();
    let mut flags = BTreeMap::new();
    for row in table.lines().filter(|l| l.starts_with("| `--")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        assert!(
            cells.len() >= 4,
            "a flag row needs flag, environment variable, default, meaning: {row}"
        );
        for flag in cells[0].split("--").skip(1) {
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.insert(name, cells[1].to_string());
        }
    }
    flags
}

#[test]
fn every_serve_flag_is_documented_with_its_environment_variable() {
    let documented = documented_flags();
    let mut missing = Vec::new();
    for (flag, env) in serve_flags() {
        if flag == "help" || flag == "version" {
            continue;
        }
        match documented.get(&flag) {
            None => missing.push(format!("--{flag}: no row")),
            Some(cell) => {
                if let Some(env) = env {
                    if !cell.contains(&format!("`{env}`")) {
                        missing.push(format!("--{flag}: its row does not name `{env}`"));
                    }
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/CONFIGURATION.md is behind `ssehub serve --help`:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_documented_flag_exists() {
    let real = serve_flags();
    let gone: Vec<String> = documented_flags()
        .into_keys()
        .filter(|flag| !real.contains_key(flag))
        .map(|flag| format!("--{flag}"))
        .collect();
    assert!(
        gone.is_empty(),
        "docs/CONFIGURATION.md documents flags `ssehub serve --help` does not know: {}",
        gone.join(", ")
    );
}
