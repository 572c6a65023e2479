//! `TCP_INFO` and `TCP_MAXSEG`: what a connection reports about itself.

use std::io;
use std::mem::size_of;
use std::os::fd::BorrowedFd;

use super::sock::{getsockopt_int, getsockopt_pod};

/// The leading, stable part of `struct tcp_info` (up to `tcpi_total_retrans`).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct TcpInfo {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, ...).
    pub state: u8,
    /// `tcpi_ca_state`.
    pub ca_state: u8,
    /// `tcpi_retransmits`.
    pub retransmits: u8,
    /// `tcpi_probes`.
    pub probes: u8,
    /// `tcpi_backoff`.
    pub backoff: u8,
    /// `tcpi_options` (`TCPI_OPT_*`).
    pub options: u8,
    /// `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4` (send scale in the low nibble).
    pub wscale: u8,
    /// `tcpi_delivery_rate_app_limited:1, tcpi_fastopen_client_fail:2`.
    pub flags: u8,
    /// `tcpi_rto`.
    pub rto: u32,
    /// `tcpi_ato`.
    pub ato: u32,
    /// `tcpi_snd_mss`.
    pub snd_mss: u32,
    /// `tcpi_rcv_mss`.
    pub rcv_mss: u32,
    /// `tcpi_unacked` (listeners: accept-queue length).
    pub unacked: u32,
    /// `tcpi_sacked` (listeners: backlog).
    pub sacked: u32,
    /// `tcpi_lost`.
    pub lost: u32,
    /// `tcpi_retrans`.
    pub retrans: u32,
    /// `tcpi_fackets`.
    pub fackets: u32,
    /// `tcpi_last_data_sent`.
    pub last_data_sent: u32,
    /// `tcpi_last_ack_sent`.
    pub last_ack_sent: u32,
    /// `tcpi_last_data_recv`.
    pub last_data_recv: u32,
    /// `tcpi_last_ack_recv`.
    pub last_ack_recv: u32,
    /// `tcpi_pmtu`.
    pub pmtu: u32,
    /// `tcpi_rcv_ssthresh`.
    pub rcv_ssthresh: u32,
    /// `tcpi_rtt`.
    pub rtt: u32,
    /// `tcpi_rttvar`.
    pub rttvar: u32,
    /// `tcpi_snd_ssthresh`.
    pub snd_ssthresh: u32,
    /// `tcpi_snd_cwnd`.
    pub snd_cwnd: u32,
    /// `tcpi_advmss`.
    pub advmss: u32,
    /// `tcpi_reordering`.
    pub reordering: u32,
    /// `tcpi_rcv_rtt`.
    pub rcv_rtt: u32,
    /// `tcpi_rcv_space`.
    pub rcv_space: u32,
    /// `tcpi_total_retrans`.
    pub total_retrans: u32,
    /// `tcpi_pacing_rate`.
    pub pacing_rate: u64,
    /// `tcpi_max_pacing_rate`.
    pub max_pacing_rate: u64,
    /// `tcpi_bytes_acked`.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`.
    pub bytes_received: u64,
    /// `tcpi_segs_out`.
    pub segs_out: u32,
    /// `tcpi_segs_in`.
    pub segs_in: u32,
    /// `tcpi_notsent_bytes` (Linux 4.6): `write_seq - snd_nxt`, what
    /// `SIOCOUTQNSD` reports for a connection.
    pub notsent_bytes: u32,
    /// `tcpi_min_rtt`.
    pub min_rtt: u32,
}
const _: () = assert!(size_of::<TcpInfo>() == 152);

/// Bytes of [`TcpInfo`] up to and including `notsent_bytes`.
pub const TCP_INFO_NOTSENT_LEN: usize = 148;

/// `TCPI_OPT_TIMESTAMPS`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `TCPI_OPT_SACK`.
pub const TCPI_OPT_SACK: u8 = 2;
/// `TCPI_OPT_WSCALE`.
pub const TCPI_OPT_WSCALE: u8 = 4;
/// `TCPI_OPT_USEC_TS`: the timestamp clock counts microseconds (Linux >= 6.7).
pub const TCPI_OPT_USEC_TS: u8 = 64;

/// `getsockopt(TCP_INFO)` (the leading part, see [`TcpInfo`]).
#[doc(alias = "TCP_INFO")]
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfo> {
    tcp_info_len(fd).map(|(info, _)| info)
}

/// [`tcp_info`] and the number of bytes the kernel filled (older kernels
/// fill less; the fields beyond are zero).
pub fn tcp_info_len(fd: BorrowedFd<'_>) -> io::Result<(TcpInfo, usize)> {
    let (info, len) = getsockopt_pod::<TcpInfo>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if len < 8 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short TCP_INFO"));
    }
    Ok((info, len))
}

/// `getsockopt(TCP_MAXSEG)`.
#[doc(alias = "TCP_MAXSEG")]
pub fn tcp_maxseg(fd: BorrowedFd<'_>) -> io::Result<u32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG).map(|v| v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout of the leading part of `struct tcp_info` (`<linux/tcp.h>`).
    #[test]
    fn layout_matches_the_kernel_header() {
        assert_eq!(size_of::<TcpInfo>(), 152);
        assert_eq!(std::mem::offset_of!(TcpInfo, rto), 8);
        assert_eq!(std::mem::offset_of!(TcpInfo, total_retrans), 100);
        assert_eq!(std::mem::offset_of!(TcpInfo, pacing_rate), 104);
        assert_eq!(std::mem::offset_of!(TcpInfo, notsent_bytes), 144);
        assert_eq!(TCP_INFO_NOTSENT_LEN, std::mem::offset_of!(TcpInfo, min_rtt));
        assert_eq!(
            (
                TCPI_OPT_TIMESTAMPS,
                TCPI_OPT_SACK,
                TCPI_OPT_WSCALE,
                TCPI_OPT_USEC_TS
            ),
            (1, 2, 4, 64)
        );
    }
}
