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
//! panics. Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and nothing
//! else: no iproute2. A namespace is made the way `ip netns add` makes it
//! (a thread's `unshare(CLONE_NEWNET)` bind-mounted on `/run/netns/<name>`,
//! so `ip netns` lists it and `ip -n <name>` works on it), and links,
//! addresses and neighbours are set up over rtnetlink. It is test setup,
//! never on the migration path.
//!
//! ```no_run
//! use lmig_net::topology::Topology;
//! let topo = Topology::new()?;
//! topo.add_service_address(&topo.a)?;
//! let local = topo.a.run(|| std::net::TcpListener::bind((Topology::SERVICE_V4, 8080)).is_ok())?;
//! assert!(local);
//! # Ok::<_, lmig_net::NetError>(())
//! ```

use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{NetError, Result};
use crate::handoff::{self, ServiceAddr};
use crate::sys;
use crate::sys::netlink::NlSocket;
use crate::sys::rtnl;

static COUNTER: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "lmig";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// One network namespace made by a [`Topology`]; removed when dropped
/// (`ip netns del`).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// `io::Error` → [`NetError::Topology`] saying what was being done.
fn setup<T>(what: impl Into<String>, r: io::Result<T>) -> Result<T> {
    r.map_err(|e| NetError::topology(what, Some(e)))
}

/// `/run/netns` exists and, as `ip netns add` leaves it, is a shared mount
/// point, so a namespace added later also appears in mount namespaces made
/// before (`ip netns exec` makes one). Best effort: the namespaces work
/// without the propagation. Done once per process.
fn prepare_netns_dir() -> Result<()> {
    let dir = Path::new(NETNS_DIR);
    setup(format!("create {NETNS_DIR}"), std::fs::create_dir_all(dir))?;
    static SHARED: Once = Once::new();
    SHARED.call_once(|| {
        if let Err(e) = sys::make_shared(dir) {
            // Not a mount point yet: make it one by binding it on itself.
            if e.raw_os_error() == Some(libc::EINVAL) && sys::bind_mount(dir, dir, true).is_ok() {
                if let Err(e) = sys::make_shared(dir) {
                    debug!(error = %e, "making the namespace directory a shared mount failed");
                }
            }
        }
    });
    Ok(())
}

/// `ip netns del <name>`: detach the bind mount that keeps the namespace
/// alive (it goes away with its last thread, socket or fd) and remove the
/// file. A namespace that is not there is not an error.
fn remove_netns(name: &str) {
    let path = netns_path(name);
    if let Err(e) = sys::detach_mount(&path) {
        debug!(error = %e, "detaching a network namespace mount failed");
    }
    if let Err(e) = std::fs::remove_file(&path) {
        debug!(error = %e, "removing a network namespace file failed");
    }
}

/// `if_nametoindex` in the calling thread's namespace.
fn index(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| NetError::topology(format!("no interface {name}"), Some(e.into())))
}

/// Wait (at most [`LINK_UP_TIMEOUT`]) until link `name` of the calling
/// thread's namespace is operationally up: before that the kernel drops
/// what it sends, and a lost first ARP request costs a one-second
/// retransmission (the handoff tests resolve neighbours with a deadline).
fn wait_oper_up(nl: &mut NlSocket, name: &str) -> Result<()> {
    let ifindex = index(name)?;
    let deadline = std::time::Instant::now() + LINK_UP_TIMEOUT;
    // Bounded by LINK_UP_TIMEOUT.
    while !setup(format!("state of {name}"), rtnl::link_oper_up(nl, ifindex))? {
        if std::time::Instant::now() >= deadline {
            return Err(NetError::topology(format!("{name} did not come up"), None));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Ok(())
}

/// How long a new link may take to become operational.
const LINK_UP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Set link `name` of the calling thread's namespace up (waiting until it
/// is operational) or down; see [`Netns::set_link`].
pub fn set_link_here(name: &str, up: bool) -> Result<()> {
    let mut nl = route_socket()?;
    let ifindex = index(name)?;
    if up {
        setup(
            format!("set {name} up"),
            rtnl::set_link_up(&mut nl, ifindex, None),
        )?;
        wait_oper_up(&mut nl, name)
    } else {
        setup(
            format!("set {name} down"),
            rtnl::set_link_down(&mut nl, ifindex),
        )
    }
}

fn route_socket() -> Result<NlSocket> {
    setup("open a NETLINK_ROUTE socket", NlSocket::route())
}

impl Netns {
    /// `ip netns add <name>`: create `/run/netns/<name>` and bind-mount on
    /// it the new network namespace of a short-lived thread that called
    /// `unshare(CLONE_NEWNET)`. The returned value removes it when dropped.
    fn create(name: String) -> Result<Self> {
        prepare_netns_dir()?;
        let path = netns_path(&name);
        setup(
            format!("create {}", path.display()),
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o0)
                .open(&path),
        )?;
        // From here on `Drop` removes the file (and the mount once made).
        let ns = Self { name };
        let h = std::thread::Builder::new()
            .name(format!("netns-add-{}", ns.name))
            .spawn(move || -> io::Result<()> {
                // Only this thread moves; the mount keeps the namespace
                // alive after the thread is gone.
                sys::unshare_net()?;
                sys::bind_mount(Path::new("/proc/thread-self/ns/net"), &path, false)
            })
            .map_err(|e| NetError::topology("spawn thread", Some(e)))?;
        match h.join() {
            Ok(r) => setup(format!("make network namespace {}", ns.name), r)?,
            Err(p) => std::panic::resume_unwind(p),
        }
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Set link `name` of this namespace up (waiting until it is
    /// operational) or down: a link cut, as `ip -n <ns> link set <name>
    /// up|down` would make it.
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        let name = name.to_string();
        self.run(move || set_link_here(&name, up))?
    }

    /// Open `/run/netns/<name>`.
    pub fn open(&self) -> Result<OwnedFd> {
        let f = std::fs::File::open(netns_path(&self.name))
            .map_err(|e| NetError::topology(format!("open netns {}", self.name), Some(e)))?;
        Ok(OwnedFd::from(f))
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

impl Drop for Netns {
    fn drop(&mut self) {
        remove_netns(&self.name);
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
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
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
            remove_netns(&name);
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
        let mk = |role: &str| Netns::create(format!("{base}-{role}"));
        // Each namespace removes itself when dropped: an error below leaves
        // nothing behind.
        let topo = Self {
            bridge: mk("br")?,
            client: mk("client")?,
            a: mk("a")?,
            b: mk("b")?,
        };
        topo.wire()?;
        Ok(topo)
    }

    fn wire(&self) -> Result<()> {
        let hosts = [
            (&self.client, "p-client", Self::CLIENT_V4, Self::CLIENT_V6),
            (&self.a, "p-a", Self::A_V4, Self::A_V6),
            (&self.b, "p-b", Self::B_V4, Self::B_V6),
        ];
        // The bridge, and a veth pair per host: `p-<host>` a port of the
        // bridge, its peer `eth0` made right inside the host's namespace.
        let ports = hosts
            .iter()
            .map(|(ns, port, ..)| Ok((*port, ns.open()?)))
            .collect::<Result<Vec<(&'static str, OwnedFd)>>>()?;
        self.bridge.run(move || -> Result<()> {
            let mut nl = route_socket()?;
            setup("add bridge br0", rtnl::add_bridge(&mut nl, "br0"))?;
            let br0 = index("br0")?;
            setup("set br0 up", rtnl::set_link_up(&mut nl, br0, None))?;
            setup("set lo up", rtnl::set_link_up(&mut nl, index("lo")?, None))?;
            for (port, host) in ports {
                setup(
                    format!("add veth {port} / eth0"),
                    rtnl::add_veth(&mut nl, port, "eth0", host.as_fd()),
                )?;
                setup(
                    format!("set {port} master br0 up"),
                    rtnl::set_link_up(&mut nl, index(port)?, Some(br0)),
                )?;
            }
            Ok(())
        })??;
        plain_switch(&self.bridge)?;
        for (ns, _, v4, v6) in hosts {
            ns.run(move || -> Result<()> {
                let mut nl = route_socket()?;
                setup("set lo up", rtnl::set_link_up(&mut nl, index("lo")?, None))?;
                let eth0 = index("eth0")?;
                handoff::add_address(eth0, &ServiceAddr::new(v4, 24))?;
                // Without duplicate address detection (`nodad`).
                handoff::add_address(eth0, &ServiceAddr::new(v6, 64))?;
                // No duplicate address detection for the link-local address
                // either: while it is tentative the kernel cannot solicit a
                // neighbour on its own (`NTF_USE`), only for a packet it sends.
                setup(
                    "disable DAD on eth0",
                    std::fs::write("/proc/sys/net/ipv6/conf/eth0/accept_dad", "0"),
                )?;
                setup("set eth0 up", rtnl::set_link_up(&mut nl, eth0, None))?;
                wait_oper_up(&mut nl, "eth0")
            })??;
        }
        let ports = hosts.map(|(_, port, ..)| port);
        self.bridge.run(move || -> Result<()> {
            let mut nl = route_socket()?;
            ports
                .iter()
                .try_for_each(|port| wait_oper_up(&mut nl, port))
        })??;
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

    fn service_addrs() -> [ServiceAddr; 2] {
        [
            ServiceAddr::new(Self::SERVICE_V4, 24),
            ServiceAddr::new(Self::SERVICE_V6, 64),
        ]
    }

    /// Add the service addresses (IPv4 and IPv6, the latter without
    /// duplicate address detection) to `host`'s `eth0`.
    pub fn add_service_address(&self, host: &Netns) -> Result<()> {
        host.run(|| -> Result<()> {
            let eth0 = index("eth0")?;
            for a in Self::service_addrs() {
                handoff::add_address(eth0, &a)?;
            }
            Ok(())
        })?
    }

    /// Move the service addresses from `from` to `to` and flush the other
    /// hosts' neighbour caches (a stand-in for the gratuitous ARP / unsolicited
    /// neighbour advertisement of the real handoff, issue 6).
    pub fn move_service_address(&self, from: &Netns, to: &Netns) -> Result<()> {
        from.run(|| -> Result<()> {
            let eth0 = index("eth0")?;
            for a in Self::service_addrs() {
                handoff::remove_address(eth0, &a)?;
            }
            Ok(())
        })??;
        self.add_service_address(to)?;
        for h in self.hosts() {
            h.run(|| flush_neighbours("eth0"))??;
        }
        Ok(())
    }
}

/// `ip neigh flush dev <dev>`: remove the IPv4 and IPv6 neighbour entries
/// of `dev` in the calling thread's namespace, except permanent and
/// no-ARP ones. One pass: entries traffic makes meanwhile stay.
fn flush_neighbours(dev: &str) -> Result<()> {
    let ifindex = index(dev)?;
    let mut nl = route_socket()?;
    let states = !(rtnl::NUD_PERMANENT | rtnl::NUD_NOARP);
    let entries = setup(
        format!("list neighbours of {dev}"),
        rtnl::neighbours(&mut nl, ifindex, states),
    )?;
    for (family, dst) in entries {
        match rtnl::del_neighbour(&mut nl, ifindex, family, &dst) {
            // Gone meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => setup(format!("flush neighbours of {dev}"), r)?,
        }
    }
    Ok(())
}
