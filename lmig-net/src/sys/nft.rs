//! nfnetlink (`NETLINK_NETFILTER`): the numbers of
//! `<linux/netfilter/nfnetlink.h>`, `<linux/netfilter/nf_tables.h>`,
//! `<linux/netfilter/nfnetlink_queue.h>` and `<linux/netfilter/xt_NFQUEUE.h>`
//! the network lock uses, and one function per message it sends (what
//! `nft add table/chain/set/rule/element`, `nft delete table`, `nft list
//! tables` and libnetfilter_queue's bind and batch verdict send).
//!
//! Every number is named here once; [`crate::lock`] calls these builders
//! and never writes an attribute number itself. Each builder appends one
//! message to a [`MsgBuf`]; nftables messages go between [`batch_begin`]
//! and [`batch_end`] (one transaction).

use super::netlink::{Attrs, F_ACK, F_CREATE, F_DUMP, F_REQUEST, MsgBuf};

/// `NFNL_SUBSYS_QUEUE`.
pub(crate) const NFNL_SUBSYS_QUEUE: u16 = 3;
/// `NFNL_SUBSYS_NFTABLES`.
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` (= `NLMSG_MIN_TYPE`).
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// `NFNL_MSG_BATCH_END`.
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `NLM_F_APPEND`: add a rule at the end of its chain.
pub(crate) const F_APPEND: u16 = 0x800;

/// `NFT_MSG_NEWTABLE`.
pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
/// `NFT_MSG_GETTABLE`.
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
/// `NFT_MSG_DELTABLE`.
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
/// `NFT_MSG_NEWCHAIN`.
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
/// `NFT_MSG_NEWRULE`.
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
/// `NFT_MSG_NEWSET`.
pub(crate) const NFT_MSG_NEWSET: u16 = 9;
/// `NFT_MSG_NEWSETELEM`.
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
/// `NFT_MSG_DELSETELEM` (without elements: flush the set).
pub(crate) const NFT_MSG_DELSETELEM: u16 = 14;

/// `NFPROTO_UNSPEC`.
pub(crate) const NFPROTO_UNSPEC: u8 = 0;
/// `NFPROTO_INET`.
pub(crate) const NFPROTO_INET: u8 = 1;
/// `NFPROTO_IPV4`.
pub(crate) const NFPROTO_IPV4: u8 = 2;
/// `NFPROTO_IPV6`.
pub(crate) const NFPROTO_IPV6: u8 = 10;

/// `NFTA_TABLE_NAME`.
pub(crate) const NFTA_TABLE_NAME: u16 = 1;
/// `NFTA_TABLE_FLAGS`.
pub(crate) const NFTA_TABLE_FLAGS: u16 = 2;
/// `NFT_TABLE_F_OWNER`: the kernel deletes the table with its netlink socket.
pub(crate) const NFT_TABLE_F_OWNER: u32 = 2;

/// `NFTA_CHAIN_TABLE`.
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
/// `NFTA_CHAIN_NAME`.
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
/// `NFTA_CHAIN_HOOK` (nested `NFTA_HOOK_*`).
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
/// `NFTA_CHAIN_POLICY`.
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
/// `NFTA_CHAIN_TYPE`.
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
/// `NFTA_HOOK_HOOKNUM`.
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
/// `NFTA_HOOK_PRIORITY`.
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
/// `NF_INET_PRE_ROUTING`.
pub(crate) const NF_INET_PRE_ROUTING: u32 = 0;
/// `NF_IP_PRI_RAW`: before conntrack and routing.
pub(crate) const NF_IP_PRI_RAW: i32 = -300;

/// `NFTA_SET_TABLE`.
pub(crate) const NFTA_SET_TABLE: u16 = 1;
/// `NFTA_SET_NAME`.
pub(crate) const NFTA_SET_NAME: u16 = 2;
/// `NFTA_SET_FLAGS`.
pub(crate) const NFTA_SET_FLAGS: u16 = 3;
/// `NFTA_SET_KEY_TYPE`.
pub(crate) const NFTA_SET_KEY_TYPE: u16 = 4;
/// `NFTA_SET_KEY_LEN`.
pub(crate) const NFTA_SET_KEY_LEN: u16 = 5;
/// `NFTA_SET_ID`: names the set to a rule of the same transaction.
pub(crate) const NFTA_SET_ID: u16 = 10;
/// nft's data type `ipv4_addr` (userspace `TYPE_IPADDR`), shown by `nft list`.
pub(crate) const NFT_TYPE_IPADDR: u32 = 7;
/// nft's data type `ipv6_addr` (userspace `TYPE_IP6ADDR`).
pub(crate) const NFT_TYPE_IP6ADDR: u32 = 8;

/// `NFTA_SET_ELEM_LIST_TABLE`.
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
/// `NFTA_SET_ELEM_LIST_SET`.
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
/// `NFTA_SET_ELEM_LIST_ELEMENTS`.
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// `NFTA_SET_ELEM_KEY` (nested `NFTA_DATA_*`).
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
/// `NFTA_DATA_VALUE`.
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
/// `NFTA_LIST_ELEM`.
pub(crate) const NFTA_LIST_ELEM: u16 = 1;

/// `NFTA_RULE_TABLE`.
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
/// `NFTA_RULE_CHAIN`.
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
/// `NFTA_RULE_EXPRESSIONS`.
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
/// `NFTA_EXPR_NAME`.
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
/// `NFTA_EXPR_DATA`.
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
/// `NFTA_PAYLOAD_DREG`.
pub(crate) const NFTA_PAYLOAD_DREG: u16 = 1;
/// `NFTA_PAYLOAD_BASE`.
pub(crate) const NFTA_PAYLOAD_BASE: u16 = 2;
/// `NFTA_PAYLOAD_OFFSET`.
pub(crate) const NFTA_PAYLOAD_OFFSET: u16 = 3;
/// `NFTA_PAYLOAD_LEN`.
pub(crate) const NFTA_PAYLOAD_LEN: u16 = 4;
/// `NFT_PAYLOAD_NETWORK_HEADER`.
pub(crate) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
/// `NFT_REG_1`.
pub(crate) const NFT_REG_1: u32 = 1;
/// `NFTA_LOOKUP_SET`.
pub(crate) const NFTA_LOOKUP_SET: u16 = 1;
/// `NFTA_LOOKUP_SREG`.
pub(crate) const NFTA_LOOKUP_SREG: u16 = 2;
/// `NFTA_LOOKUP_SET_ID`.
pub(crate) const NFTA_LOOKUP_SET_ID: u16 = 4;
/// `NFTA_TARGET_NAME` (xtables target through `nft_compat`).
pub(crate) const NFTA_TARGET_NAME: u16 = 1;
/// `NFTA_TARGET_REV`.
pub(crate) const NFTA_TARGET_REV: u16 = 2;
/// `NFTA_TARGET_INFO`.
pub(crate) const NFTA_TARGET_INFO: u16 = 3;
/// Revision of `struct xt_NFQ_info_v3`.
pub(crate) const XT_NFQUEUE_REV: u32 = 3;
/// `sizeof(struct xt_NFQ_info_v3)` padded to 8 (`queuenum`, `queues_total`, `flags`).
pub(crate) const XT_NFQ_INFO_V3_LEN: usize = 8;

/// `NFQNL_MSG_PACKET`.
pub(crate) const NFQNL_MSG_PACKET: u16 = 0;
/// `NFQNL_MSG_CONFIG`.
pub(crate) const NFQNL_MSG_CONFIG: u16 = 2;
/// `NFQNL_MSG_VERDICT_BATCH`.
pub(crate) const NFQNL_MSG_VERDICT_BATCH: u16 = 3;
/// `NFQA_PACKET_HDR` (`struct nfqnl_msg_packet_hdr`, id first).
pub(crate) const NFQA_PACKET_HDR: u16 = 1;
/// `NFQA_VERDICT_HDR` (`struct nfqnl_msg_verdict_hdr`).
pub(crate) const NFQA_VERDICT_HDR: u16 = 2;
/// `NFQA_PAYLOAD`.
pub(crate) const NFQA_PAYLOAD: u16 = 10;
/// `NFQA_CFG_CMD` (`struct nfqnl_msg_config_cmd`).
pub(crate) const NFQA_CFG_CMD: u16 = 1;
/// `NFQA_CFG_PARAMS` (`struct nfqnl_msg_config_params`).
pub(crate) const NFQA_CFG_PARAMS: u16 = 2;
/// `NFQA_CFG_QUEUE_MAXLEN`.
pub(crate) const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
/// `NFQNL_CFG_CMD_BIND`.
pub(crate) const NFQNL_CFG_CMD_BIND: u8 = 1;
/// `NFQNL_COPY_PACKET`.
pub(crate) const NFQNL_COPY_PACKET: u8 = 2;
/// `NF_DROP`.
pub(crate) const NF_DROP: u32 = 0;
/// `NF_ACCEPT`.
pub(crate) const NF_ACCEPT: u32 = 1;

/// The netlink message type of nftables message `msg`.
pub(crate) fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// The netlink message type of NFQUEUE message `msg`.
pub(crate) fn queue_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_QUEUE << 8) | msg
}

/// `NFNL_MSG_BATCH_BEGIN` for nftables: opens a transaction.
pub(crate) fn batch_begin(m: &mut MsgBuf, seq: u32) {
    m.begin(NFNL_MSG_BATCH_BEGIN, F_REQUEST, seq)
        .nfgen(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES)
        .end();
}

/// `NFNL_MSG_BATCH_END`: commits the transaction.
pub(crate) fn batch_end(m: &mut MsgBuf, seq: u32) {
    m.begin(NFNL_MSG_BATCH_END, F_REQUEST, seq)
        .nfgen(NFPROTO_UNSPEC, NFNL_SUBSYS_NFTABLES)
        .end();
}

/// `NFT_MSG_NEWTABLE` `name` in family `fam`; `owner`: with
/// `NFT_TABLE_F_OWNER` (gone with the socket).
pub(crate) fn new_table(m: &mut MsgBuf, seq: u32, fam: u8, name: &str, owner: bool) {
    m.begin(
        nft_type(NFT_MSG_NEWTABLE),
        F_REQUEST | F_CREATE | F_ACK,
        seq,
    )
    .nfgen(fam, 0)
    .attr_str(NFTA_TABLE_NAME, name);
    if owner {
        m.attr_be32(NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER);
    }
    m.end();
}

/// `NFT_MSG_NEWCHAIN`: a base chain `chain` of type `filter` at
/// `prerouting`, priority `raw`, policy accept.
pub(crate) fn new_prerouting_chain(m: &mut MsgBuf, seq: u32, fam: u8, table: &str, chain: &str) {
    m.begin(
        nft_type(NFT_MSG_NEWCHAIN),
        F_REQUEST | F_CREATE | F_ACK,
        seq,
    )
    .nfgen(fam, 0)
    .attr_str(NFTA_CHAIN_TABLE, table)
    .attr_str(NFTA_CHAIN_NAME, chain)
    .nest(NFTA_CHAIN_HOOK)
    .attr_be32(NFTA_HOOK_HOOKNUM, NF_INET_PRE_ROUTING)
    .attr_be32(NFTA_HOOK_PRIORITY, NF_IP_PRI_RAW as u32)
    .unnest()
    .attr_be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
    .attr_str(NFTA_CHAIN_TYPE, "filter")
    .end();
}

/// `(nft key type, key length, offset of the destination address in the
/// network header)` of family `fam` (IPv4 or IPv6).
pub(crate) fn daddr_key(fam: u8) -> (u32, u32, u32) {
    if fam == NFPROTO_IPV4 {
        (NFT_TYPE_IPADDR, 4, 16)
    } else {
        (NFT_TYPE_IP6ADDR, 16, 24)
    }
}

/// `NFT_MSG_NEWSET`: an empty hash set `set` of destination addresses of
/// family `fam`, known to the rules of this transaction as `set_id`.
pub(crate) fn new_addr_set(m: &mut MsgBuf, seq: u32, fam: u8, table: &str, set: &str, set_id: u32) {
    let (key_type, key_len, _) = daddr_key(fam);
    m.begin(nft_type(NFT_MSG_NEWSET), F_REQUEST | F_CREATE | F_ACK, seq)
        .nfgen(fam, 0)
        .attr_str(NFTA_SET_TABLE, table)
        .attr_str(NFTA_SET_NAME, set)
        .attr_be32(NFTA_SET_FLAGS, 0)
        .attr_be32(NFTA_SET_KEY_TYPE, key_type)
        .attr_be32(NFTA_SET_KEY_LEN, key_len)
        .attr_be32(NFTA_SET_ID, set_id)
        .end();
}

/// `NFT_MSG_NEWRULE` appended to `chain`: `ip(6) daddr @set → NFQUEUE
/// num queue_num` (payload load into reg 1, lookup in the set `set_id`,
/// the xtables NFQUEUE v3 target through `nft_compat`).
// One argument per part of the rule, as `nft add rule` names them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn new_queue_rule(
    m: &mut MsgBuf,
    seq: u32,
    fam: u8,
    table: &str,
    chain: &str,
    set: &str,
    set_id: u32,
    queue_num: u16,
) {
    let (_, key_len, offset) = daddr_key(fam);
    let mut info = [0u8; XT_NFQ_INFO_V3_LEN];
    info[0..2].copy_from_slice(&queue_num.to_ne_bytes());
    info[2..4].copy_from_slice(&1u16.to_ne_bytes()); // queues_total
    m.begin(
        nft_type(NFT_MSG_NEWRULE),
        F_REQUEST | F_CREATE | F_ACK | F_APPEND,
        seq,
    )
    .nfgen(fam, 0)
    .attr_str(NFTA_RULE_TABLE, table)
    .attr_str(NFTA_RULE_CHAIN, chain)
    .nest(NFTA_RULE_EXPRESSIONS);
    m.nest(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "payload")
        .nest(NFTA_EXPR_DATA);
    m.attr_be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
        .attr_be32(NFTA_PAYLOAD_BASE, NFT_PAYLOAD_NETWORK_HEADER)
        .attr_be32(NFTA_PAYLOAD_OFFSET, offset)
        .attr_be32(NFTA_PAYLOAD_LEN, key_len);
    m.unnest().unnest();
    m.nest(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "lookup")
        .nest(NFTA_EXPR_DATA);
    m.attr_str(NFTA_LOOKUP_SET, set)
        .attr_be32(NFTA_LOOKUP_SREG, NFT_REG_1)
        .attr_be32(NFTA_LOOKUP_SET_ID, set_id);
    m.unnest().unnest();
    m.nest(NFTA_LIST_ELEM)
        .attr_str(NFTA_EXPR_NAME, "target")
        .nest(NFTA_EXPR_DATA);
    m.attr_str(NFTA_TARGET_NAME, "NFQUEUE")
        .attr_be32(NFTA_TARGET_REV, XT_NFQUEUE_REV)
        .attr(NFTA_TARGET_INFO, &info);
    m.unnest().unnest();
    m.unnest().end();
}

/// `NFT_MSG_NEWSETELEM`: add the addresses `keys` (raw bytes) to `set`.
pub(crate) fn add_set_elems<'a>(
    m: &mut MsgBuf,
    seq: u32,
    fam: u8,
    table: &str,
    set: &str,
    keys: impl IntoIterator<Item = &'a [u8]>,
) {
    m.begin(
        nft_type(NFT_MSG_NEWSETELEM),
        F_REQUEST | F_CREATE | F_ACK,
        seq,
    )
    .nfgen(fam, 0)
    .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
    .attr_str(NFTA_SET_ELEM_LIST_SET, set)
    .nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    for key in keys {
        m.nest(NFTA_LIST_ELEM)
            .nest(NFTA_SET_ELEM_KEY)
            .attr(NFTA_DATA_VALUE, key)
            .unnest()
            .unnest();
    }
    m.unnest().end();
}

/// `NFT_MSG_DELSETELEM` without elements: flush `set`.
pub(crate) fn flush_set(m: &mut MsgBuf, seq: u32, fam: u8, table: &str, set: &str) {
    m.begin(nft_type(NFT_MSG_DELSETELEM), F_REQUEST | F_ACK, seq)
        .nfgen(fam, 0)
        .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
        .attr_str(NFTA_SET_ELEM_LIST_SET, set)
        .end();
}

/// `NFT_MSG_DELTABLE` `name` in family `fam`.
pub(crate) fn del_table(m: &mut MsgBuf, seq: u32, fam: u8, name: &str) {
    m.begin(nft_type(NFT_MSG_DELTABLE), F_REQUEST | F_ACK, seq)
        .nfgen(fam, 0)
        .attr_str(NFTA_TABLE_NAME, name)
        .end();
}

/// `NFT_MSG_GETTABLE` dump request: every table of every family.
pub(crate) fn get_tables(m: &mut MsgBuf, seq: u32) {
    m.begin(nft_type(NFT_MSG_GETTABLE), F_REQUEST | F_DUMP, seq)
        .nfgen(NFPROTO_UNSPEC, 0)
        .end();
}

/// `(family, name)` of one table of a `NFT_MSG_GETTABLE` dump.
pub(crate) fn parse_table(payload: &[u8]) -> Option<(u8, String)> {
    let &fam = payload.first()?;
    Attrs::new(payload.get(4..).unwrap_or(&[]))
        .find(|(kind, _)| *kind == NFTA_TABLE_NAME)
        .map(|(_, value)| {
            let name = value.split(|&b| b == 0).next().unwrap_or(&[]);
            (fam, String::from_utf8_lossy(name).into_owned())
        })
}

/// `NFQNL_MSG_CONFIG` on queue `num`: bind it, copy whole packets (or only
/// their first [`HEADER_COPY`] bytes), hold at most `maxlen`.
pub(crate) fn queue_bind(m: &mut MsgBuf, seq: u32, num: u16, maxlen: u32, copy_payload: bool) {
    let mut params = [0u8; 5];
    // Without the payload: the headers (IPv4 with options or IPv6, then
    // the ports), enough to tell which socket a packet goes to.
    let range: u32 = if copy_payload { 0xffff } else { HEADER_COPY };
    params[0..4].copy_from_slice(&range.to_be_bytes()); // copy_range
    params[4] = NFQNL_COPY_PACKET;
    m.begin(queue_type(NFQNL_MSG_CONFIG), F_REQUEST | F_ACK, seq)
        .nfgen(NFPROTO_UNSPEC, num)
        .attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0])
        .attr(NFQA_CFG_PARAMS, &params)
        .attr_be32(NFQA_CFG_QUEUE_MAXLEN, maxlen)
        .end();
}

/// Bytes of each held packet copied when the payload is not wanted.
pub(crate) const HEADER_COPY: u32 = 128;

/// `NFQNL_MSG_VERDICT_BATCH` on queue `num`: `verdict` for every packet up
/// to id `max_id`.
pub(crate) fn verdict_batch(m: &mut MsgBuf, seq: u32, num: u16, max_id: u32, verdict: u32) {
    let mut v = [0u8; 8];
    v[0..4].copy_from_slice(&verdict.to_be_bytes());
    v[4..8].copy_from_slice(&max_id.to_be_bytes());
    m.begin(queue_type(NFQNL_MSG_VERDICT_BATCH), F_REQUEST, seq)
        .nfgen(NFPROTO_UNSPEC, num)
        .attr(NFQA_VERDICT_HDR, &v)
        .end();
}

/// The packet id and the IP packet (if copied) of one `NFQNL_MSG_PACKET`
/// payload; `None` without a packet header.
pub(crate) fn parse_queued(payload: &[u8]) -> Option<(u32, Option<&[u8]>)> {
    let (mut id, mut data) = (None, None);
    for (kind, value) in Attrs::new(payload.get(4..)?) {
        match kind {
            NFQA_PACKET_HDR if value.len() >= 4 => {
                id = Some(u32::from_be_bytes([value[0], value[1], value[2], value[3]]))
            }
            NFQA_PAYLOAD => data = Some(value),
            _ => {}
        }
    }
    id.map(|id| (id, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers libc has, as libc has them.
    #[test]
    fn numbers_match_the_kernel_headers() {
        assert_eq!(NFNL_SUBSYS_QUEUE as i32, libc::NFNL_SUBSYS_QUEUE);
        assert_eq!(NFNL_SUBSYS_NFTABLES as i32, libc::NFNL_SUBSYS_NFTABLES);
        assert_eq!(NFNL_MSG_BATCH_BEGIN as i32, libc::NFNL_MSG_BATCH_BEGIN);
        assert_eq!(NFNL_MSG_BATCH_END as i32, libc::NFNL_MSG_BATCH_END);
        assert_eq!(F_APPEND as i32, libc::NLM_F_APPEND);
        assert_eq!(NFT_MSG_NEWTABLE as i32, libc::NFT_MSG_NEWTABLE);
        assert_eq!(NFT_MSG_GETTABLE as i32, libc::NFT_MSG_GETTABLE);
        assert_eq!(NFT_MSG_DELTABLE as i32, libc::NFT_MSG_DELTABLE);
        assert_eq!(NFT_MSG_NEWCHAIN as i32, libc::NFT_MSG_NEWCHAIN);
        assert_eq!(NFT_MSG_NEWRULE as i32, libc::NFT_MSG_NEWRULE);
        assert_eq!(NFT_MSG_NEWSET as i32, libc::NFT_MSG_NEWSET);
        assert_eq!(NFT_MSG_NEWSETELEM as i32, libc::NFT_MSG_NEWSETELEM);
        assert_eq!(NFT_MSG_DELSETELEM as i32, libc::NFT_MSG_DELSETELEM);
        assert_eq!(NFPROTO_UNSPEC as i32, libc::NFPROTO_UNSPEC);
        assert_eq!(NFPROTO_INET as i32, libc::NFPROTO_INET);
        assert_eq!(NFPROTO_IPV4 as i32, libc::NFPROTO_IPV4);
        assert_eq!(NFPROTO_IPV6 as i32, libc::NFPROTO_IPV6);
        assert_eq!(NF_INET_PRE_ROUTING as i32, libc::NF_INET_PRE_ROUTING);
        assert_eq!(NF_IP_PRI_RAW, libc::NF_IP_PRI_RAW);
        assert_eq!(
            NFT_PAYLOAD_NETWORK_HEADER as i32,
            libc::NFT_PAYLOAD_NETWORK_HEADER
        );
        assert_eq!(NFT_REG_1 as i32, libc::NFT_REG_1);
        assert_eq!(NFQNL_MSG_PACKET as i32, libc::NFQNL_MSG_PACKET);
        assert_eq!(NFQNL_MSG_CONFIG as i32, libc::NFQNL_MSG_CONFIG);
        assert_eq!(
            NFQNL_MSG_VERDICT_BATCH as i32,
            libc::NFQNL_MSG_VERDICT_BATCH
        );
        assert_eq!(NFQA_PACKET_HDR as i32, libc::NFQA_PACKET_HDR);
        assert_eq!(NFQA_VERDICT_HDR as i32, libc::NFQA_VERDICT_HDR);
        assert_eq!(NFQA_PAYLOAD as i32, libc::NFQA_PAYLOAD);
        assert_eq!(NFQA_CFG_CMD as i32, libc::NFQA_CFG_CMD);
        assert_eq!(NFQA_CFG_PARAMS as i32, libc::NFQA_CFG_PARAMS);
        assert_eq!(NFQA_CFG_QUEUE_MAXLEN as i32, libc::NFQA_CFG_QUEUE_MAXLEN);
        assert_eq!(NFQNL_CFG_CMD_BIND as i32, libc::NFQNL_CFG_CMD_BIND);
        assert_eq!(NFQNL_COPY_PACKET as i32, libc::NFQNL_COPY_PACKET);
        assert_eq!(NF_DROP as i32, libc::NF_DROP);
        assert_eq!(NF_ACCEPT as i32, libc::NF_ACCEPT);
    }

    /// The attribute numbers libc lacks, from `<linux/netfilter/nf_tables.h>`.
    #[test]
    fn nftables_attribute_numbers() {
        assert_eq!(
            (NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFT_TABLE_F_OWNER),
            (1, 2, 2)
        );
        assert_eq!(
            (
                NFTA_CHAIN_TABLE,
                NFTA_CHAIN_NAME,
                NFTA_CHAIN_HOOK,
                NFTA_CHAIN_POLICY,
                NFTA_CHAIN_TYPE
            ),
            (1, 3, 4, 5, 7)
        );
        assert_eq!((NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY), (1, 2));
        assert_eq!(
            (
                NFTA_SET_TABLE,
                NFTA_SET_NAME,
                NFTA_SET_FLAGS,
                NFTA_SET_KEY_TYPE,
                NFTA_SET_KEY_LEN
            ),
            (1, 2, 3, 4, 5)
        );
        assert_eq!(NFTA_SET_ID, 10);
        assert_eq!(
            (
                NFTA_SET_ELEM_LIST_TABLE,
                NFTA_SET_ELEM_LIST_SET,
                NFTA_SET_ELEM_LIST_ELEMENTS
            ),
            (1, 2, 3)
        );
        assert_eq!(
            (NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE, NFTA_LIST_ELEM),
            (1, 1, 1)
        );
        assert_eq!(
            (NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS),
            (1, 2, 4)
        );
        assert_eq!((NFTA_EXPR_NAME, NFTA_EXPR_DATA), (1, 2));
        assert_eq!(
            (
                NFTA_PAYLOAD_DREG,
                NFTA_PAYLOAD_BASE,
                NFTA_PAYLOAD_OFFSET,
                NFTA_PAYLOAD_LEN
            ),
            (1, 2, 3, 4)
        );
        assert_eq!(
            (NFTA_LOOKUP_SET, NFTA_LOOKUP_SREG, NFTA_LOOKUP_SET_ID),
            (1, 2, 4)
        );
        assert_eq!(
            (NFTA_TARGET_NAME, NFTA_TARGET_REV, NFTA_TARGET_INFO),
            (1, 2, 3)
        );
    }

    #[test]
    fn a_verdict_batch_carries_verdict_then_id_big_endian() {
        let mut m = MsgBuf::new();
        verdict_batch(&mut m, 1, 0x4001, 77, NF_ACCEPT);
        let b = m.bytes();
        assert_eq!(
            u16::from_ne_bytes([b[4], b[5]]),
            queue_type(NFQNL_MSG_VERDICT_BATCH)
        );
        // nfgenmsg: family, version, res_id (big-endian queue number).
        assert_eq!(&b[16..20], &[NFPROTO_UNSPEC, 0, 0x40, 0x01]);
        let attrs: Vec<_> = Attrs::new(&b[20..]).collect();
        assert_eq!(
            attrs,
            vec![(NFQA_VERDICT_HDR, &[0, 0, 0, 1, 0, 0, 0, 77][..])]
        );
    }

    #[test]
    fn queued_packets_parse_id_and_payload() {
        let mut p = vec![0u8; 4];
        let mut m = MsgBuf::new();
        m.begin(queue_type(NFQNL_MSG_PACKET), 0, 1)
            .raw(&p)
            .attr(NFQA_PACKET_HDR, &[0, 0, 1, 2, 8, 0, 0])
            .attr(NFQA_PAYLOAD, &[0x45, 0, 0, 20])
            .end();
        let b = m.bytes();
        assert_eq!(
            parse_queued(&b[16..]),
            Some((0x102, Some(&[0x45, 0, 0, 20][..])))
        );
        p.extend_from_slice(&[4, 0, 9, 0]);
        assert_eq!(parse_queued(&p), None);
        assert_eq!(parse_queued(&[1, 2]), None);
    }

    #[test]
    fn table_dump_entries_give_family_and_name() {
        let mut m = MsgBuf::new();
        new_table(&mut m, 1, NFPROTO_IPV6, "lmig_lock_1_0", true);
        let b = m.bytes();
        assert_eq!(
            parse_table(&b[16..]),
            Some((NFPROTO_IPV6, "lmig_lock_1_0".into()))
        );
        let attrs: Vec<_> = Attrs::new(&b[20..]).map(|(t, _)| t).collect();
        assert_eq!(attrs, vec![NFTA_TABLE_NAME, NFTA_TABLE_FLAGS]);
    }
}
