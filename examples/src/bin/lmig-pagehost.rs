//! `lmig-pagehost --id N [--listen ADDR]`: an lmig page host.
//!
//! Holds part of a split region's pages for a running host, serves
//! fetches, stores evicted pages and sends its share straight to other
//! hosts (lmig-mem's `PageHost` over lmig-transport channels). The key is
//! the hex string in `LMIG_PAGEHOST_KEY` (32 bytes); it prints
//! `LISTENING <address>` and serves until its parent exits.

use std::time::Duration;

use clap::Parser;
use lmig_examples::common::keys::key_from_hex;
use lmig_examples::pagehost::{KEY_ENV, page_host_main};

#[derive(Parser)]
#[command(name = "lmig-pagehost", about = "lmig page host (split memory)")]
struct Cli {
    /// This host's id in the owner map.
    #[arg(long)]
    id: u32,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Exit after this many seconds at the latest.
    #[arg(long, default_value_t = 86_400)]
    lifetime_secs: u64,
}

fn main() {
    let cli = Cli::parse();
    let result = std::env::var(KEY_ENV)
        .map_err(|_| format!("{KEY_ENV} (hex key) is not set").into())
        .and_then(|k| key_from_hex(&k))
        .and_then(|key| {
            page_host_main(
                cli.id,
                &cli.listen,
                &key,
                Duration::from_secs(cli.lifetime_secs),
            )
        });
    if let Err(e) = result {
        eprintln!("lmig-pagehost: {e}");
        std::process::exit(1);
    }
}
