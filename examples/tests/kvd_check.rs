//! `kvd check`, the built binary: exit 0 and every capability OK as root
//! (this machine runs the whole suite); as `nobody`, exit 1 with the
//! privileged capabilities missing and their fix named.

use std::os::unix::process::CommandExt;
use std::process::Command;

use lmig_core::probe::Capability;
use lmig_core::testing::{NOBODY, privileged};

fn kvd_check(as_nobody: bool) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvd"));
    cmd.arg("check");
    if as_nobody {
        cmd.gid(NOBODY).uid(NOBODY);
    }
    let out = cmd.output().expect("run kvd check");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().expect("kvd check exited"), text)
}

/// The status column of `cap`'s line in the table.
fn status(table: &str, cap: Capability) -> &str {
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(cap.name()))
        .unwrap_or_else(|| panic!("no line for {cap}:\n{table}"));
    line.split_whitespace().nth(1).unwrap()
}

#[test]
fn kvd_check_as_root_and_as_nobody() {
    if !privileged(
        "kvd_check_as_root_and_as_nobody",
        "TCP repair, nftables, switching users",
    ) {
        return;
    }
    let (code, table) = kvd_check(false);
    assert_eq!(code, 0, "{table}");
    for &cap in Capability::ALL {
        assert_eq!(status(&table, cap), "OK", "{cap}:\n{table}");
    }
    assert!(
        table.contains("kvd: everything it needs is here"),
        "{table}"
    );

    let (code, table) = kvd_check(true);
    assert_eq!(code, 1, "{table}");
    for cap in [
        Capability::TcpRepair,
        Capability::NetworkLock,
        Capability::RawSockets,
        Capability::PacketSockets,
    ] {
        assert_eq!(status(&table, cap), "missing", "{cap}:\n{table}");
        assert!(
            table.contains(&format!("kvd: missing {cap}, needed for")),
            "{table}"
        );
    }
    assert!(
        table.contains("fix: run as root or grant CAP_NET_ADMIN"),
        "{table}"
    );
    assert!(
        table.contains("fix: run as root or grant CAP_NET_RAW"),
        "{table}"
    );
}
