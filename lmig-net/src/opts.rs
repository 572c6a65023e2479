//! Reading and applying the socket and TCP options of the model
//! ([`SockOpts`], [`TcpOpts`]).
//!
//! On restore only options that differ from a fresh socket's defaults are set,
//! so a connection with default options costs no extra system call.

use std::os::fd::BorrowedFd;

use lmig_core::model::{SockOpts, TcpOpts};

use crate::error::{NetError, Result};
use crate::sys;

const SOL_SOCKET: i32 = libc::SOL_SOCKET;
const TCP: i32 = libc::IPPROTO_TCP;

fn get(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    op: &'static str,
    what: &dyn Fn() -> String,
) -> Result<i32> {
    sys::getsockopt_int(fd, level, name).map_err(|e| NetError::sys(op, what(), e))
}

fn set(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    val: i32,
    op: &'static str,
    what: &dyn Fn() -> String,
) -> Result<()> {
    sys::setsockopt_int(fd, level, name, val).map_err(|e| NetError::sys(op, what(), e))
}

/// What the program set with `SO_RCVBUF`/`SO_SNDBUF`: the kernel reports twice that.
/// Captured only when asked (see [`crate::NetSourceConfig::capture_buffer_sizes`]):
/// setting a size locks it and turns TCP's buffer auto-tuning off.
pub(crate) fn read_sock_opts(
    fd: BorrowedFd<'_>,
    v6: bool,
    reuse_addr: bool,
    buffers: bool,
    what: &dyn Fn() -> String,
) -> Result<SockOpts> {
    let mut o = SockOpts {
        reuse_addr,
        reuse_port: get(
            fd,
            SOL_SOCKET,
            libc::SO_REUSEPORT,
            "getsockopt(SO_REUSEPORT)",
            what,
        )? != 0,
        mark: get(fd, SOL_SOCKET, libc::SO_MARK, "getsockopt(SO_MARK)", what)? as u32,
        priority: get(
            fd,
            SOL_SOCKET,
            libc::SO_PRIORITY,
            "getsockopt(SO_PRIORITY)",
            what,
        )? as u32,
        ..SockOpts::default()
    };
    if buffers {
        o.rcvbuf = get(
            fd,
            SOL_SOCKET,
            libc::SO_RCVBUF,
            "getsockopt(SO_RCVBUF)",
            what,
        )? as u32
            / 2;
        o.sndbuf = get(
            fd,
            SOL_SOCKET,
            libc::SO_SNDBUF,
            "getsockopt(SO_SNDBUF)",
            what,
        )? as u32
            / 2;
    }
    if v6 {
        o.tos = get(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            "getsockopt(IPV6_TCLASS)",
            what,
        )? as u8;
        o.v6only = get(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            "getsockopt(IPV6_V6ONLY)",
            what,
        )? != 0;
    } else {
        o.tos = get(
            fd,
            libc::IPPROTO_IP,
            libc::IP_TOS,
            "getsockopt(IP_TOS)",
            what,
        )? as u8;
    }
    o.bind_device = sys::getsockopt_string(fd, SOL_SOCKET, libc::SO_BINDTODEVICE)
        .map_err(|e| NetError::sys("getsockopt(SO_BINDTODEVICE)", what(), e))?;
    Ok(o)
}

/// TCP options; `default_cc` is the namespace's default congestion control,
/// which is recorded as `None`.
pub(crate) fn read_tcp_opts(
    fd: BorrowedFd<'_>,
    default_cc: Option<&str>,
    what: &dyn Fn() -> String,
) -> Result<TcpOpts> {
    let keepalive = get(
        fd,
        SOL_SOCKET,
        libc::SO_KEEPALIVE,
        "getsockopt(SO_KEEPALIVE)",
        what,
    )? != 0;
    let cc = sys::getsockopt_string(fd, TCP, libc::TCP_CONGESTION)
        .map_err(|e| NetError::sys("getsockopt(TCP_CONGESTION)", what(), e))?;
    Ok(TcpOpts {
        nodelay: get(fd, TCP, libc::TCP_NODELAY, "getsockopt(TCP_NODELAY)", what)? != 0,
        keepalive,
        keep_idle: get(
            fd,
            TCP,
            libc::TCP_KEEPIDLE,
            "getsockopt(TCP_KEEPIDLE)",
            what,
        )? as u32,
        keep_intvl: get(
            fd,
            TCP,
            libc::TCP_KEEPINTVL,
            "getsockopt(TCP_KEEPINTVL)",
            what,
        )? as u32,
        keep_cnt: get(fd, TCP, libc::TCP_KEEPCNT, "getsockopt(TCP_KEEPCNT)", what)? as u32,
        user_timeout: get(
            fd,
            TCP,
            libc::TCP_USER_TIMEOUT,
            "getsockopt(TCP_USER_TIMEOUT)",
            what,
        )? as u32,
        congestion: cc.filter(|c| Some(c.as_str()) != default_cc),
    })
}

/// A fresh socket's options in this namespace, to skip setting defaults on restore.
#[derive(Clone, Debug, Default)]
pub(crate) struct Defaults {
    pub sock: SockOpts,
    pub tcp: TcpOpts,
    pub congestion: Option<String>,
}

impl Defaults {
    /// Probe a fresh IPv4 TCP socket of the calling thread's namespace.
    pub(crate) fn probe() -> Result<Self> {
        let fd = sys::socket(libc::AF_INET, libc::SOCK_STREAM, 0)
            .map_err(|e| NetError::sys("socket", "probe socket", e))?;
        let what = || "probe socket".to_string();
        let sock = read_sock_opts(std::os::fd::AsFd::as_fd(&fd), false, false, false, &what)?;
        let mut tcp = read_tcp_opts(std::os::fd::AsFd::as_fd(&fd), None, &what)?;
        let congestion = tcp.congestion.take();
        Ok(Self {
            sock,
            tcp,
            congestion,
        })
    }
}

/// Set the socket options that differ from `d` (everything but `SO_REUSEADDR`,
/// which repair mode overrides: see [`apply_reuse_addr`]). `IPV6_V6ONLY` only
/// when `before_bind` (the kernel refuses it on a bound socket).
pub(crate) fn apply_sock_opts(
    fd: BorrowedFd<'_>,
    v6: bool,
    before_bind: bool,
    o: &SockOpts,
    d: &SockOpts,
    what: &dyn Fn() -> String,
) -> Result<()> {
    if o.reuse_port != d.reuse_port {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_REUSEPORT,
            o.reuse_port as i32,
            "setsockopt(SO_REUSEPORT)",
            what,
        )?;
    }
    if o.rcvbuf != 0 {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_RCVBUF,
            o.rcvbuf as i32,
            "setsockopt(SO_RCVBUF)",
            what,
        )?;
    }
    if o.sndbuf != 0 {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_SNDBUF,
            o.sndbuf as i32,
            "setsockopt(SO_SNDBUF)",
            what,
        )?;
    }
    if o.mark != d.mark {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_MARK,
            o.mark as i32,
            "setsockopt(SO_MARK)",
            what,
        )?;
    }
    if o.priority != d.priority {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_PRIORITY,
            o.priority as i32,
            "setsockopt(SO_PRIORITY)",
            what,
        )?;
    }
    if o.tos != d.tos {
        if v6 {
            set(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_TCLASS,
                o.tos as i32,
                "setsockopt(IPV6_TCLASS)",
                what,
            )?;
        } else {
            set(
                fd,
                libc::IPPROTO_IP,
                libc::IP_TOS,
                o.tos as i32,
                "setsockopt(IP_TOS)",
                what,
            )?;
        }
    }
    if v6 && before_bind && o.v6only {
        set(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            1,
            "setsockopt(IPV6_V6ONLY)",
            what,
        )?;
    }
    if let Some(dev) = &o.bind_device {
        sys::setsockopt_string(fd, SOL_SOCKET, libc::SO_BINDTODEVICE, dev)
            .map_err(|e| NetError::sys("setsockopt(SO_BINDTODEVICE)", what(), e))?;
    }
    Ok(())
}

/// `SO_REUSEADDR`: leaving repair mode resets it, so it is applied afterwards.
pub(crate) fn apply_reuse_addr(
    fd: BorrowedFd<'_>,
    o: &SockOpts,
    what: &dyn Fn() -> String,
) -> Result<()> {
    if o.reuse_addr {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_REUSEADDR,
            1,
            "setsockopt(SO_REUSEADDR)",
            what,
        )?;
    }
    Ok(())
}

/// Set the TCP options that differ from `d`.
pub(crate) fn apply_tcp_opts(
    fd: BorrowedFd<'_>,
    o: &TcpOpts,
    d: &Defaults,
    what: &dyn Fn() -> String,
) -> Result<()> {
    let t = &d.tcp;
    if o.nodelay != t.nodelay {
        set(
            fd,
            TCP,
            libc::TCP_NODELAY,
            o.nodelay as i32,
            "setsockopt(TCP_NODELAY)",
            what,
        )?;
    }
    if o.keep_idle != t.keep_idle && o.keep_idle != 0 {
        set(
            fd,
            TCP,
            libc::TCP_KEEPIDLE,
            o.keep_idle as i32,
            "setsockopt(TCP_KEEPIDLE)",
            what,
        )?;
    }
    if o.keep_intvl != t.keep_intvl && o.keep_intvl != 0 {
        set(
            fd,
            TCP,
            libc::TCP_KEEPINTVL,
            o.keep_intvl as i32,
            "setsockopt(TCP_KEEPINTVL)",
            what,
        )?;
    }
    if o.keep_cnt != t.keep_cnt && o.keep_cnt != 0 {
        set(
            fd,
            TCP,
            libc::TCP_KEEPCNT,
            o.keep_cnt as i32,
            "setsockopt(TCP_KEEPCNT)",
            what,
        )?;
    }
    if o.user_timeout != t.user_timeout {
        set(
            fd,
            TCP,
            libc::TCP_USER_TIMEOUT,
            o.user_timeout as i32,
            "setsockopt(TCP_USER_TIMEOUT)",
            what,
        )?;
    }
    if o.keepalive != t.keepalive {
        set(
            fd,
            SOL_SOCKET,
            libc::SO_KEEPALIVE,
            o.keepalive as i32,
            "setsockopt(SO_KEEPALIVE)",
            what,
        )?;
    }
    if let Some(cc) = &o.congestion {
        if Some(cc) != d.congestion.as_ref() {
            sys::setsockopt_string(fd, TCP, libc::TCP_CONGESTION, cc)
                .map_err(|e| NetError::sys("setsockopt(TCP_CONGESTION)", what(), e))?;
        }
    }
    Ok(())
}

/// An established connection's socket and TCP options (those given; a part
/// not given is left as the socket has it), each compared with a fresh
/// socket's `d`: set on a prepared socket before `connect`, before the
/// freeze when the plan carries them. `SO_REUSEADDR` is left to
/// activation (see [`apply_reuse_addr`]).
pub(crate) fn apply_conn_opts(
    fd: BorrowedFd<'_>,
    v6: bool,
    sock: Option<&SockOpts>,
    tcp: Option<&TcpOpts>,
    d: &Defaults,
    what: &dyn Fn() -> String,
) -> Result<()> {
    if let Some(o) = sock {
        apply_sock_opts(fd, v6, false, o, &d.sock, what)?;
    }
    if let Some(o) = tcp {
        apply_tcp_opts(fd, o, d, what)?;
    }
    Ok(())
}
