//! The flag reference cannot drift from the binary: every long flag `ssehub serve --help`
//! prints must have a row in docs/CONFIGURATION.md with its environment variable and the default
//! the binary prints, and every flag documented there must still exist. Hidden flags are not
//! printed, so they are not asked for.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// What `ssehub serve --help` says of one long flag.
#[derive(Default)]
struct HelpFlag {
    /// The environment variable clap names for it (`None` for flags without one, such as `--help`).
    env: Option<String>,
    /// Its default value, when it has one.
    default: Option<String>,
}

/// Long flags of `ssehub serve --help`.
fn serve_flags() -> BTreeMap<String, HelpFlag> {
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
                flags.insert(name.clone(), HelpFlag::default());
                current = Some(name);
                continue;
            }
        }
        let Some(flag) = current.as_ref().and_then(|name| flags.get_mut(name)) else {
            continue;
        };
        if let Some(env) = trimmed.strip_prefix("[env: ") {
            let var: String = env
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            flag.env = Some(var);
        } else if let Some(default) = trimmed.strip_prefix("[default: ") {
            flag.default = default.strip_suffix(']').map(str::to_string);
        }
    }
    assert!(
        flags.contains_key("listen") && flags.contains_key("publisher-jwt-key"),
        "could not read the flags from ssehub serve --help:\n{help}"
    );
    flags
}

/// One row of the flags table in docs/CONFIGURATION.md.
struct DocRow {
    /// The second cell: the environment variables.
    env: String,
    /// The third cell: the default.
    default: String,
}

/// The rows of the flags table in docs/CONFIGURATION.md, by each long flag of a row's first cell.
fn documented_flags() -> BTreeMap<String, DocRow> {
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
            flags.insert(
                name,
                DocRow {
                    env: cells[1].to_string(),
                    default: cells[2].trim().to_string(),
                },
            );
        }
    }
    flags
}

#[test]
fn every_serve_flag_is_documented_with_its_environment_variable() {
    let documented = documented_flags();
    let mut missing = Vec::new();
    for (flag, help) in serve_flags() {
        if flag == "help" || flag == "version" {
            continue;
        }
        match documented.get(&flag) {
            None => missing.push(format!("--{flag}: no row")),
            Some(row) => {
                if let Some(env) = help.env {
                    if !row.env.contains(&format!("`{env}`")) {
                        missing.push(format!("--{flag}: its row does not name `{env}`"));
                    }
                }
                // A default the binary prints must be the row's, as code (a row may explain a
                // computed default in words when clap prints none).
                if let Some(default) = help.default {
                    if row.default != format!("`{default}`") {
                        missing.push(format!(
                            "--{flag}: its row's default is {}, the binary's `{default}`",
                            row.default
                        ));
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
