//! What the post-copy tests over real TCP share: the page content a source
//! region is filled with and the channel's configuration.

use std::time::Duration;

use lmig_transport::{AuthKey, ChannelConfig};

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
