//! `transfer`: pages moved between two processes over loopback TCP through
//! the channel, in one of its security modes (`--psk`, the default:
//! Noise-encrypted; `--tls`: TLS 1.3 with certificates from a CA made for the
//! run; `--plaintext`), against plain TCP between two processes in the same
//! run. `cipher` names what protected the bytes.
//!
//! This process is the source: it re-executes the benchmark binary with the
//! hidden `transfer-peer` command as the destination, which listens on
//! 127.0.0.1 and prints its address. Pages go as `Pages` messages of one
//! chunk (64 × 4 KiB) each, chunk `c` on lane `c % streams`, one sending
//! thread per lane; the time runs from the first page sent to the
//! destination's `Done` after the last page arrived. `raw_tcp_gbps` moves
//! the same bytes over `streams` plain TCP connections in 256 KiB writes,
//! timed the same way (to a one-byte acknowledgement).

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args as ClapArgs;
use lmig_core::Channel;
use lmig_core::model::{PageRun, RegionId};
use lmig_core::protocol::{CHUNK_PAGES, Message, PageBatch, PageData, Verification};
use lmig_transport::{AuthKey, ChannelConfig, Endpoint, Listener, TlsIdentity, connect};
use serde_json::json;

use super::{Output, round};

/// Options of the `transfer` scenario.
#[derive(Debug, Clone, ClapArgs)]
pub struct Args {
    /// MiB of pages to move.
    #[arg(long, default_value_t = 1024)]
    pub mib: usize,
    /// Data streams (and plain TCP connections for the baseline).
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// TLS 1.3 with mutual certificates (a CA and two certificates made for the run).
    #[arg(long, conflicts_with_all = ["psk", "plaintext"])]
    pub tls: bool,
    /// Noise keyed by a pre-shared key (the default).
    #[arg(long, conflicts_with = "plaintext")]
    pub psk: bool,
    /// Authenticated by a pre-shared key, then unencrypted.
    #[arg(long)]
    pub plaintext: bool,
}

impl Args {
    fn security(&self) -> &'static str {
        if self.tls {
            "tls"
        } else if self.plaintext {
            "plaintext"
        } else {
            "psk"
        }
    }
}

/// Options of the hidden `transfer-peer` command (the destination).
#[derive(Debug, Clone, ClapArgs)]
pub struct PeerArgs {
    /// `channel` or `raw`.
    #[arg(long)]
    pub mode: String,
    /// MiB to receive.
    #[arg(long)]
    pub mib: usize,
    /// Connections (raw mode).
    #[arg(long)]
    pub streams: usize,
    /// The pre-shared key, hex.
    #[arg(long, default_value = "")]
    pub key: String,
    /// `psk`, `tls` or `plaintext` (channel mode).
    #[arg(long, default_value = "psk")]
    pub security: String,
    /// Directory of `ca.pem`, `listener.pem`, `listener.key` (TLS).
    #[arg(long, default_value = "")]
    pub tls_dir: String,
}

const CHUNK_BYTES: usize = CHUNK_PAGES as usize * 4096;
const T: Duration = Duration::from_secs(120);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, Box<dyn Error>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(Into::into))
        .collect()
}

/// A CA and a certificate for each side, as PEM files in `dir` (the
/// listener's names 127.0.0.1, the address the dialer connects to).
fn make_certificates(dir: &Path) -> Result<(), Box<dyn Error>> {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    for side in ["listener", "dialer"] {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        std::fs::write(dir.join(format!("{side}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{side}.key")), key.serialize_pem())?;
    }
    Ok(())
}

fn tls_identity(dir: &Path, side: &str) -> Result<TlsIdentity, Box<dyn Error>> {
    Ok(TlsIdentity::from_pem_files(
        dir.join(format!("{side}.pem")),
        dir.join(format!("{side}.key")),
        dir.join("ca.pem"),
    )?)
}

/// The channel configuration of one side for `security`.
fn channel_config(
    security: &str,
    key: &[u8],
    tls_dir: &Path,
    side: &str,
) -> Result<ChannelConfig, Box<dyn Error>> {
    Ok(match security {
        "psk" => ChannelConfig::new(AuthKey::new(key)?),
        "plaintext" => ChannelConfig::plaintext_trusted_link_only(AuthKey::new(key)?),
        "tls" => ChannelConfig::tls(tls_identity(tls_dir, side)?),
        other => return Err(format!("unknown security mode {other}").into()),
    })
}

fn spawn_peer(
    mode: &str,
    args: &Args,
    key: &str,
    tls_dir: &Path,
) -> Result<(Child, SocketAddr), Box<dyn Error>> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["transfer-peer", "--mode", mode, "--mib"])
        .arg(args.mib.to_string())
        .arg("--streams")
        .arg(args.streams.to_string())
        .args(["--key", key, "--security", args.security(), "--tls-dir"])
        .arg(tls_dir)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no peer stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("LISTEN ")
        .ok_or_else(|| format!("peer said {line:?}"))?
        .parse()?;
    Ok((child, addr))
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

/// Run the scenario (the source side).
pub fn run(args: Args, out: Output) -> Result<(), Box<dyn Error>> {
    if args.streams == 0 || args.mib == 0 {
        return Err("--mib and --streams must be at least 1".into());
    }
    let total = args.mib << 20;
    let data: Vec<u8> = (0..total)
        .map(|i| (i as u8) ^ ((i >> 12) as u8) | 1)
        .collect();
    let data = Bytes::from(data);

    let tls_dir = std::env::temp_dir().join(format!("lmig-transfer-{}", std::process::id()));
    std::fs::create_dir_all(&tls_dir)?;
    let result = measure(&args, &data, &tls_dir);
    let _ = std::fs::remove_dir_all(&tls_dir);
    let (raw, chan, handshake, cipher) = result?;
    out.emit(&json!({
        "scenario": "transfer",
        "mib": args.mib,
        "streams": args.streams,
        "security": args.security(),
        "cipher": cipher,
        "gbps": round(gbps(total, chan), 2),
        "raw_tcp_gbps": round(gbps(total, raw), 2),
        "ratio": round(raw.as_secs_f64() / chan.as_secs_f64(), 2),
        "handshake_ms": round(handshake.as_secs_f64() * 1e3, 2),
    }));
    Ok(())
}

/// The baseline and the channel: (raw time, channel time, handshake time, cipher).
fn measure(
    args: &Args,
    data: &Bytes,
    tls_dir: &Path,
) -> Result<(Duration, Duration, Duration, String), Box<dyn Error>> {
    let total = data.len();
    if args.tls {
        make_certificates(tls_dir)?;
    }

    // Plain TCP baseline.
    let (mut child, addr) = spawn_peer("raw", args, "", tls_dir)?;
    let mut conns = Vec::new();
    for _ in 0..args.streams {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        conns.push(s);
    }
    let share = total / args.streams;
    let t = Instant::now();
    let handles: Vec<_> = conns
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut s = s.try_clone().expect("clone");
            let data = data.slice(i * share..(i + 1) * share);
            thread::spawn(move || -> std::io::Result<()> {
                for c in data.chunks(CHUNK_BYTES) {
                    s.write_all(c)?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "sender panicked")??;
    }
    let mut ack = [0u8; 1];
    conns[0].set_read_timeout(Some(T))?;
    conns[0].read_exact(&mut ack)?;
    let raw = t.elapsed();
    child.wait()?;
    drop(conns);

    // The authenticated channel, with a fresh key that only travels to our
    // own child process (on its command line).
    let mut key_bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key_bytes)?;
    let (mut child, addr) = spawn_peer("channel", args, &hex(&key_bytes), tls_dir)?;
    let config = channel_config(args.security(), &key_bytes, tls_dir, "dialer")?
        .with_data_streams(args.streams);
    let t = Instant::now();
    let ch = Arc::new(connect(&Endpoint::Tcp(addr), config)?);
    let handshake = t.elapsed();
    let cipher = ch.cipher().to_string();
    let chunks = total / CHUNK_BYTES;
    let t = Instant::now();
    let handles: Vec<_> = (0..args.streams)
        .map(|lane| {
            let ch = ch.clone();
            let data = data.clone();
            let streams = args.streams;
            thread::spawn(move || -> lmig_core::Result<()> {
                for c in (lane..chunks).step_by(streams) {
                    let batch = PageBatch {
                        round: 0,
                        run: PageRun::new(
                            RegionId(0),
                            (c * CHUNK_PAGES as usize) as u64,
                            CHUNK_PAGES,
                        ),
                        data: PageData::Raw(data.slice(c * CHUNK_BYTES..(c + 1) * CHUNK_BYTES)),
                    };
                    ch.send_pages(lane, &batch)?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "sender panicked")??;
    }
    match ch.recv(Some(T))? {
        Some(Message::Done(_)) => {}
        other => return Err(format!("expected Done, got {other:?}").into()),
    }
    let chan = t.elapsed();
    child.wait()?;
    Ok((raw, chan, handshake, cipher))
}

/// The destination side (hidden command).
pub fn peer(args: PeerArgs) -> Result<(), Box<dyn Error>> {
    let total = args.mib << 20;
    let mut stdout = std::io::stdout();
    match args.mode.as_str() {
        "raw" => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            writeln!(stdout, "LISTEN {}", l.local_addr()?)?;
            stdout.flush()?;
            let mut conns = Vec::new();
            for _ in 0..args.streams {
                conns.push(l.accept()?.0);
            }
            let share = total / args.streams;
            let handles: Vec<_> = conns
                .iter()
                .map(|s| {
                    let mut s = s.try_clone().expect("clone");
                    thread::spawn(move || -> std::io::Result<()> {
                        let mut buf = vec![0u8; CHUNK_BYTES];
                        let mut left = share;
                        while left > 0 {
                            let n = s.read(&mut buf[..left.min(CHUNK_BYTES)])?;
                            if n == 0 {
                                return Err(std::io::ErrorKind::UnexpectedEof.into());
                            }
                            left -= n;
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join().map_err(|_| "receiver panicked")??;
            }
            conns[0].write_all(&[1])?;
        }
        "channel" => {
            let config = channel_config(
                &args.security,
                &unhex(&args.key)?,
                Path::new(&args.tls_dir),
                "listener",
            )?;
            let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse()?), config)?;
            let Endpoint::Tcp(addr) = listener.local_endpoint() else {
                return Err("not TCP".into());
            };
            writeln!(stdout, "LISTEN {addr}")?;
            stdout.flush()?;
            let ch = listener.accept_timeout(T)?;
            let mut got = 0usize;
            while got < total {
                match ch.recv(Some(T))? {
                    Some(Message::Pages(b)) => match b.data {
                        PageData::Raw(d) => got += d.len(),
                        PageData::Zero => got += b.run.count as usize * 4096,
                    },
                    Some(other) => return Err(format!("unexpected {}", other.name()).into()),
                    None => return Err("timed out".into()),
                }
            }
            ch.send(&Message::Done(Verification::NotChecked))?;
            // Let the Done frame leave before the channel closes.
            let _ = ch.recv(Some(Duration::from_secs(5)));
        }
        m => return Err(format!("unknown mode {m}").into()),
    }
    Ok(())
}
