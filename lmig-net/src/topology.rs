//! Test topology: network namespaces joined by veth pairs and a bridge.
//!
//! Three hosts — `client`, `a` (the source) and `b` (the destination) — each
//! a network namespace with one interface `eth0` plugged into a bridge that
//! lives in a fourth namespace. Addresses come from TEST-NET-2
//! (198.51.100.0/24) and the documentation prefix 2001:db8::/32 only:
//!
//! | host | IPv4 | IPv6 |
//! |---|---|---|
//! | client | 198.51.100.10 | 2001:db8::10 |
//! | a | 198.51.100.1 | 2001:db8::1 |
//! | b | 198.51.100.2 | 2001:db8::2 |
//! | service (movable) | 198.51.100.100 | 2001:db8::100 |
//!
//! Namespace names carry the process id and a counter, so tests running in
//! parallel (threads or processes) never clash; namespaces left over by a
//! crashed run of a process that no longer exists are removed on the next
//! [`Topology::new`]. Everything is removed in `Drop`, also when a test
//! panics. Setup uses the `ip` command (iproute2): it is test setup, never
//! on the migration path. Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`).
//!
//! ```no_run
//! use lmig_net::topology::Topology;
//! let topo = Topology::new()?;
//! topo.add_service_address(&topo.a)?;
//! let local = topo.a.run(|| std::net::TcpListener::bind((Topology::SERVICE_V4, 8080)).is_ok())?;
//! assert!(local);
//! # Ok::<_, lmig_net::NetError>(())
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{NetError, Result};
use crate::sys;

static COUNTER: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "lmig";

/// One network namespace made by a [`Topology`].
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetError::topology("cannot run `ip` (is iproute2 installed?)", Some(e)))?;
    if !out.status.success() {
        return Err(NetError::topology(
            format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            None,
        ));
    }
    Ok(())
}

impl Netns {
    /// The namespace's name (as `ip netns` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Open `/run/netns/<name>`.
    pub fn open(&self) -> Result<OwnedFd> {
        let f = std::fs::File::open(format!("/run/netns/{}", self.name))
            .map_err(|e| NetError::topology(format!("open netns {}", self.name), Some(e)))?;
        Ok(OwnedFd::from(f))
    }

    /// Run `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Run `f` on a new thread that entered this namespace (`setns`); threads
    /// that `f` starts inherit it. Returns `f`'s result; a panic in `f` is
    /// propagated.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
        let ns = self.open()?;
        let h = std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || -> std::result::Result<R, std::io::Error> {
                sys::setns_net(ns.as_fd())?;
                drop(ns);
                Ok(f())
            })
            .map_err(|e| NetError::topology("spawn thread", Some(e)))?;
        match h.join() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(NetError::topology(
                format!("setns into {}", self.name),
                Some(e),
            )),
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Like [`Netns::run`] without waiting: the thread's handle is returned.
    pub fn spawn_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<std::thread::JoinHandle<std::result::Result<R, std::io::Error>>> {
        let ns = self.open()?;
        std::thread::Builder::new()
            .name(format!("netns-{}", self.name))
            .spawn(move || {
                sys::setns_net(ns.as_fd())?;
                drop(ns);
                Ok(f())
            })
            .map_err(|e| NetError::topology("spawn thread", Some(e)))
    }

    /// Start `cmd` inside this namespace (the child enters it before `exec`).
    pub fn spawn(&self, cmd: &mut Command) -> Result<Child> {
        sys::command_in_netns(cmd, self.open()?);
        cmd.spawn()
            .map_err(|e| NetError::topology(format!("spawn in {}", self.name), Some(e)))
    }
}

/// Make the bridge namespace a plain switch: where `br_netfilter` is loaded
/// (Docker loads it) the kernel runs the IP and ARP netfilter hooks for every
/// frame `br0` forwards, per namespace and on by default. A switch between
/// hosts does no such work; here it cost every packet between the test hosts
/// a second pass through netfilter, CPU the hosts then lack.
fn plain_switch(bridge: &Netns) -> Result<()> {
    bridge
        .run(|| {
            for knob in ["iptables", "ip6tables", "arptables"] {
                let path = format!("/proc/sys/net/bridge/bridge-nf-call-{knob}");
                match std::fs::write(&path, "0") {
                    // Absent: br_netfilter is not loaded, nothing to turn off.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    r => r?,
                }
            }
            Ok(())
        })?
        .map_err(|e| {
            NetError::topology("turn bridge netfilter off in the bridge namespace", Some(e))
        })
}

/// Client, source (`a`) and destination (`b`) hosts on one bridge.
#[derive(Debug)]
pub struct Topology {
    /// The client host.
    pub client: Netns,
    /// Host A, the migration source.
    pub a: Netns,
    /// Host B, the migration destination.
    pub b: Netns,
    bridge: Netns,
}

fn remove_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for ent in dir.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run_ip(&["netns", "del", &name]);
        }
    }
}

impl Topology {
    /// Client IPv4 address.
    pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
    /// Host A IPv4 address.
    pub const A_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
    /// Host B IPv4 address.
    pub const B_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
    /// The movable service IPv4 address.
    pub const SERVICE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
    /// Client IPv6 address.
    pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
    /// Host A IPv6 address.
    pub const A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    /// Host B IPv6 address.
    pub const B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
    /// The movable service IPv6 address.
    pub const SERVICE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);

    /// Create the namespaces, veth pairs, bridge and addresses.
    pub fn new() -> Result<Self> {
        remove_stale();
        let base = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mk = |role: &str| -> Result<Netns> {
            let name = format!("{base}-{role}");
            run_ip(&["netns", "add", &name])?;
            Ok(Netns { name })
        };
        // Build the value early so Drop cleans up whatever was created.
        let bridge = mk("br")?;
        let mut partial = vec![];
        let client = match mk("client") {
            Ok(n) => n,
            Err(e) => {
                let _ = run_ip(&["netns", "del", &bridge.name]);
                return Err(e);
            }
        };
        partial.push(());
        let a = match mk("a") {
            Ok(n) => n,
            Err(e) => {
                let _ = run_ip(&["netns", "del", &bridge.name]);
                let _ = run_ip(&["netns", "del", &client.name]);
                return Err(e);
            }
        };
        let b = match mk("b") {
            Ok(n) => n,
            Err(e) => {
                for n in [&bridge, &client, &a] {
                    let _ = run_ip(&["netns", "del", &n.name]);
                }
                return Err(e);
            }
        };
        let topo = Self {
            client,
            a,
            b,
            bridge,
        };
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let br = &self.bridge;
        br.ip(&["link", "add", "br0", "type", "bridge"])?;
        br.ip(&["link", "set", "br0", "up"])?;
        br.ip(&["link", "set", "lo", "up"])?;
        plain_switch(br)?;
        let hosts = [
            (&self.client, "p-client", Self::CLIENT_V4, Self::CLIENT_V6),
            (&self.a, "p-a", Self::A_V4, Self::A_V6),
            (&self.b, "p-b", Self::B_V4, Self::B_V6),
        ];
        for (ns, port, v4, v6) in hosts {
            br.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            br.ip(&["link", "set", port, "master", "br0"])?;
            br.ip(&["link", "set", port, "up"])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            // No duplicate address detection for the link-local address
            // either: while it is tentative the kernel cannot solicit a
            // neighbour on its own (`NTF_USE`), only for a packet it sends.
            ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0"))?
                .map_err(|e| NetError::topology("disable DAD on eth0", Some(e)))?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The namespace holding the bridge `br0` (e.g. to capture every packet).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// The three hosts.
    pub fn hosts(&self) -> [&Netns; 3] {
        [&self.client, &self.a, &self.b]
    }

    /// Add the service addresses (IPv4 and IPv6) to `host`.
    pub fn add_service_address(&self, host: &Netns) -> Result<()> {
        host.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::SERVICE_V4),
            "dev",
            "eth0",
        ])?;
        host.ip(&[
            "addr",
            "add",
            &format!("{}/64", Self::SERVICE_V6),
            "dev",
            "eth0",
            "nodad",
        ])
    }

    /// Move the service addresses from `from` to `to` and flush the other
    /// hosts' neighbour caches (a stand-in for the gratuitous ARP / unsolicited
    /// neighbour advertisement of the real handoff, issue 6).
    pub fn move_service_address(&self, from: &Netns, to: &Netns) -> Result<()> {
        from.ip(&[
            "addr",
            "del",
            &format!("{}/24", Self::SERVICE_V4),
            "dev",
            "eth0",
        ])?;
        from.ip(&[
            "addr",
            "del",
            &format!("{}/64", Self::SERVICE_V6),
            "dev",
            "eth0",
        ])?;
        self.add_service_address(to)?;
        for h in self.hosts() {
            h.ip(&["neigh", "flush", "dev", "eth0"])?;
            h.ip(&["-6", "neigh", "flush", "dev", "eth0"])?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in [&self.client, &self.a, &self.b, &self.bridge] {
            let _ = run_ip(&["netns", "del", &n.name]);
        }
    }
}
