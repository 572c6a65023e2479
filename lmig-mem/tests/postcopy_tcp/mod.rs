//! What the post-copy tests over real TCP share: the page content a source
//! region is filled with, the channel's configuration and listener, the
//! source's run and the check of the destination's pages.

use std::time::Duration;

use lmig_core::MemorySource;
use lmig_core::model::RegionId;
use lmig_core::session::{Source, SourceConfig, SourceReport};
use lmig_core::testing::NullProgram;
use lmig_mem::{DestinationRegions, ManualTracker, RegionOptions, RegionSet};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, StreamChannel, connect};

/// Bytes of a page.
pub const PS: usize = 4096;

/// Page `page`'s content: its number in the first 8 bytes, the rest the
/// page number's low byte XOR `salt` (each test its own salt).
pub fn pattern(page: u64, salt: u8) -> Vec<u8> {
    let mut v = vec![(page as u8) ^ salt; PS];
    v[..8].copy_from_slice(&page.to_le_bytes());
    v
}

/// A channel with two data streams under `key`, every wait bounded.
pub fn config(key: &[u8; 32]) -> ChannelConfig {
    let mut c = ChannelConfig::new(AuthKey::new(key).unwrap()).with_data_streams(2);
    c.handshake_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(5);
    c.write_timeout = Some(Duration::from_secs(20));
    c
}

/// A mapped source region `region` of `pages` pages, each filled with
/// [`pattern`]`(page, salt)`.
pub fn source_region(region: RegionId, pages: u64, salt: u8) -> RegionSet {
    let src =
        RegionSet::new([RegionOptions::new(region, pages * PS as u64).map().unwrap()]).unwrap();
    for p in 0..pages {
        src.get(region)
            .unwrap()
            .write_at(p as usize * PS, &pattern(p, salt))
            .unwrap();
    }
    src
}

/// A channel listener on a free loopback port, and the address to dial.
pub fn listen(config: ChannelConfig) -> (Listener, Endpoint) {
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), config).unwrap();
    let target = listener.local_endpoint().clone();
    (listener, target)
}

/// Every page of the destination's region `region` reads as
/// [`pattern`]`(page, salt)` (so each must be in: a missing one blocks).
pub fn assert_pages(what: &str, dst: &DestinationRegions, region: RegionId, pages: u64, salt: u8) {
    let set = dst.regions().unwrap();
    let mut v = vec![0u8; PS];
    for p in 0..pages {
        set.get(region)
            .unwrap()
            .read_at(p as usize * PS, &mut v)
            .unwrap();
        assert_eq!(v, pattern(p, salt), "{what}: page {p}");
    }
}

/// Dial `target` and run a source of `src` with `cfg` (its tracker marks
/// nothing: post-copy), then close the channel.
pub fn run_source(
    target: &Endpoint,
    config: ChannelConfig,
    src: &RegionSet,
    cfg: SourceConfig,
) -> lmig_core::Result<SourceReport> {
    let channel: StreamChannel = connect(target, config).unwrap();
    let layout = MemorySource::layout(src);
    let report = Source::new(
        &channel,
        src,
        ManualTracker::new(&layout),
        NullProgram::default(),
    )
    .with_config(cfg)
    .run();
    lmig_core::Channel::shutdown(&channel);
    report
}
