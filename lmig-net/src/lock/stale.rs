//! Lock tables left behind by dead processes ([`clean_stale`]), and the
//! test support that looks at nftables state ([`testing`], feature
//! `test-util`).

use std::io;

use super::{TABLE_PREFIX, lock_err};
use crate::error::Result;
use crate::sys::netlink::{MsgBuf, NlSocket};
use crate::sys::nft::{self, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};

/// Find lock tables left by processes that no longer exist (a crashed
/// run) and delete them; returns their names (`family/name`).
///
/// Tables of live processes, and tables the kernel guards for a live owner
/// socket, are left alone.
pub fn clean_stale() -> Result<Vec<String>> {
    let mut nft =
        NlSocket::netfilter().map_err(|e| lock_err("netlink socket", "NETLINK_NETFILTER", e))?;
    let tables =
        list_tables(&mut nft).map_err(|e| lock_err("nftables list tables", "ruleset", e))?;
    let stale = tables.into_iter().filter(|(_, name)| {
        name.strip_prefix(TABLE_PREFIX)
            .and_then(|p| p.split('_').next()?.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
    });
    let mut removed = Vec::new();
    for (fam, name) in stale {
        let mut m = MsgBuf::new();
        let seq = nft.next_seq();
        nft::batch_begin(&mut m, seq);
        let seq = nft.next_seq();
        nft::del_table(&mut m, seq, fam, &name);
        let seq = nft.next_seq();
        nft::batch_end(&mut m, seq);
        if nft.transact(m.bytes(), m.acks).is_ok() {
            removed.push(table_label(fam, &name));
        }
    }
    Ok(removed)
}

/// `NFT_MSG_GETTABLE` dump: `(family, name)` of every nftables table in the
/// namespace of the socket.
fn list_tables(nft: &mut NlSocket) -> io::Result<Vec<(u8, String)>> {
    let mut m = MsgBuf::new();
    nft::get_tables(&mut m, nft.next_seq());
    let mut tables = Vec::new();
    nft.dump(m.bytes(), |_kind, payload| {
        tables.extend(nft::parse_table(payload));
    })?;
    Ok(tables)
}

/// `ip/<name>`, `ip6/<name>` (the family as `nft` names it).
fn table_label(fam: u8, name: &str) -> String {
    let fam = match fam {
        NFPROTO_IPV4 => "ip",
        NFPROTO_IPV6 => "ip6",
        NFPROTO_INET => "inet",
        _ => "other",
    };
    format!("{fam}/{name}")
}

/// Test support (feature `test-util`): look at and fake the nftables state
/// the lock leaves, without the `nft` tool. Not part of the stable API.
#[cfg(feature = "test-util")]
pub mod testing {
    use super::*;

    /// Every nftables table in the calling thread's network namespace, as
    /// `ip/<name>`, `ip6/<name>` or `inet/<name>`.
    pub fn tables() -> Result<Vec<String>> {
        let mut nft = NlSocket::netfilter()
            .map_err(|e| lock_err("netlink socket", "NETLINK_NETFILTER", e))?;
        let tables =
            list_tables(&mut nft).map_err(|e| lock_err("nftables list tables", "ruleset", e))?;
        Ok(tables.iter().map(|(f, n)| table_label(*f, n)).collect())
    }

    /// Create an empty table `name` of family `ip` (or `ip6` when `ipv6`)
    /// that no socket owns, like `nft add table`: a stand-in for the table
    /// of a crashed run.
    pub fn add_table(ipv6: bool, name: &str) -> Result<()> {
        let mut nft = NlSocket::netfilter()
            .map_err(|e| lock_err("netlink socket", "NETLINK_NETFILTER", e))?;
        let fam = if ipv6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
        let mut m = MsgBuf::new();
        let seq = nft.next_seq();
        nft::batch_begin(&mut m, seq);
        let seq = nft.next_seq();
        nft::new_table(&mut m, seq, fam, name, false);
        let seq = nft.next_seq();
        nft::batch_end(&mut m, seq);
        nft.transact(m.bytes(), m.acks)
            .map_err(|e| lock_err("nftables add table", name, e))
    }
}
