//! Pre-shared keys as the programs pass them to their children: hex strings
//! in the environment or on the command line.

use super::process::PeerError;

/// 32 random bytes from the kernel, hex-encoded: a fresh key for a peer.
pub fn random_key_hex() -> Result<String, PeerError> {
    use std::io::Read;
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    Ok(k.iter().map(|b| format!("{b:02x}")).collect())
}

/// Decode [`random_key_hex`]'s output.
pub fn key_from_hex(hex: &str) -> Result<Vec<u8>, PeerError> {
    if !hex.len().is_multiple_of(2) {
        return Err("odd-length key".into());
    }
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(Into::into))
        .collect()
}
