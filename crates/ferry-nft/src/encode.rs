//! ferry's table encoded as one nf_tables netlink batch (pure: a [`Ruleset`] in, bytes out).
//!
//! A full load through libnftables renders ~100 MB of `nft` text at 10,000 services and has
//! libnftables parse it back into a tree many times that size before it builds these same
//! messages; here the messages are built straight from the typed IR. Each construct encodes to
//! the expressions `nft` itself generates for it (checked by `nft --debug=netlink` when this
//! was written, and by `tests/kernel.rs`, which loads the same tables both ways and compares
//! `nft list table` of the two, text for text), so the kernel holds the same table and
//! `nft list table inet ferry` reads the same whichever path loaded it.
//!
//! What it does not know (a construct added to the IR later) is [`Unsupported`]: the caller
//! then loads through libnftables as before.

use std::net::IpAddr;

use ferry_model::cidr::Cidr;
use ferry_model::Protocol;
use ferry_plan::diff::Op;
use ferry_plan::ir::{
    quote, Action, BaseChain, Chain, ChainType, Element, Family, Hook, KeyType, Match, Rule, Set,
    Value, Verdict, TABLE,
};
use ferry_plan::Ruleset;

/// A construct the encoder does not know: load through libnftables instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not encodable as netlink: {0}")]
pub struct Unsupported(pub String);

// linux/netfilter/nfnetlink.h, nf_tables.h, netfilter.h
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;

const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;

// libnftnl's userdata TLVs (the comment is type 0 for tables, chains, rules and elements).
const UDATA_COMMENT: u8 = 0;
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const UDATA_SET_COMMENT: u8 = 7;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_DATA_TYPEOF: u8 = 4;
const UDATA_SET_DATA_INTERVAL: u8 = 6;
/// nft's `BYTEORDER_BIG_ENDIAN`.
const BYTEORDER_BIG_ENDIAN: u32 = 2;

// Registers: the verdict, the 16-byte NFT_REG_1/2, and the 4-byte NFT_REG32_00.. (8..).
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_00: u32 = 8;

/// The register nft names for the 4-byte word `word` of the register file: a 16-byte register
/// where one starts (NFT_REG_1..4), else the 4-byte one (NFT_REG32_xx).
fn reg_at(word: u32) -> u32 {
    if word.is_multiple_of(4) {
        REG_1 + word / 4
    } else {
        REG32_00 + word
    }
}

/// The largest payload of one attribute (its length is 16 bits).
const MAX_ATTR: usize = 0xffff - 4;

/// Builds netlink messages into one buffer.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
    seq: u32,
    /// The table the messages name (empty: [`TABLE`]).
    table: String,
    /// Set IDs already used in this batch (a batch may span tables).
    ids_used: u32,
}

impl Writer {
    /// The attribute naming the table the messages are about.
    fn table_attr(&mut self, kind: u16) {
        let t = std::mem::take(&mut self.table);
        self.str(kind, if t.is_empty() { TABLE } else { &t });
        self.table = t;
    }

    fn msg_start(&mut self, kind: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.buf.len();
        self.seq = self.seq.wrapping_add(1);
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf
            .extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn msg_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn nft_msg(&mut self, kind: u16, flags: u16) -> usize {
        self.msg_start(NFNL_SUBSYS_NFTABLES << 8 | kind, flags, NFPROTO_INET, 0)
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        self.buf
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    fn pad(&mut self) {
        let n = (self.buf.len() + 3) & !3;
        self.buf.resize(n, 0);
    }

    fn str(&mut self, kind: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.attr(kind, &v);
    }

    fn be32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) -> Result<(), Unsupported> {
        let len = self.buf.len() - at;
        if len > MAX_ATTR {
            return Err(Unsupported(format!("a nested attribute of {len} bytes")));
        }
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
        Ok(())
    }

    /// `NFTA_DATA_VALUE` inside `kind`.
    fn data(&mut self, kind: u16, value: &[u8]) -> Result<(), Unsupported> {
        let n = self.nest(kind);
        self.attr(NFTA_DATA_VALUE, value);
        self.nest_end(n)
    }

    fn verdict(&mut self, kind: u16, v: &Verdict) -> Result<(), Unsupported> {
        let n = self.nest(kind);
        let d = self.nest(NFTA_DATA_VERDICT);
        let (code, chain) = match v {
            Verdict::Accept => (1i32, None),
            Verdict::Drop => (0, None),
            Verdict::Return => (-5, None),
            Verdict::Jump(c) => (-3, Some(c)),
            Verdict::Goto(c) => (-4, Some(c)),
        };
        self.be32(NFTA_VERDICT_CODE, code as u32);
        if let Some(c) = chain {
            self.str(NFTA_VERDICT_CHAIN, c);
        }
        self.nest_end(d)?;
        self.nest_end(n)
    }

    /// One expression: `name` and its attributes written by `body`.
    fn expr(
        &mut self,
        name: &str,
        body: impl FnOnce(&mut Writer) -> Result<(), Unsupported>,
    ) -> Result<(), Unsupported> {
        let e = self.nest(NFTA_LIST_ELEM);
        self.str(NFTA_EXPR_NAME, name);
        let d = self.nest(NFTA_EXPR_DATA);
        body(self)?;
        self.nest_end(d)?;
        self.nest_end(e)
    }
}

/// A userdata blob of one comment TLV (cleaned as [`quote`] cleans it; NUL-terminated).
fn comment_udata(kind: u8, comment: &str) -> Vec<u8> {
    let q = quote(comment);
    let text = &q[1..q.len() - 1];
    let mut v = vec![kind, (text.len() + 1) as u8];
    v.extend_from_slice(text.as_bytes());
    v.push(0);
    v
}

/// One userdata TLV (a type byte, a length byte, the value).
fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![kind, value.len() as u8];
    v.extend_from_slice(value);
    v
}

/// The `typeof` of an endpoint map's key or data (see `Set::typeof_text`) as nft 1.0.6
/// writes it in the set's userdata, so that `nft list` shows the set as `typeof ...` and can
/// read it back: a concatenation (nft's expression type 13) of payload (7: protocol
/// description, field), meta (9: key) and numgen (23: type, modulus, offset) expressions,
/// each a TLV numbered by its position, numbers in the host's byte order; ports are
/// `proto`'s (`tcp dport`).
fn typeof_udata(kind: u8, fields: &[KeyType], proto: Protocol) -> Vec<u8> {
    let u32s = |vals: &[u32]| -> Vec<u8> {
        vals.iter()
            .enumerate()
            .flat_map(|(i, v)| tlv(i as u8, &v.to_ne_bytes()))
            .collect()
    };
    // (nft's expression type, its own userdata)
    let expr = |t: KeyType| -> (u32, Vec<u8>) {
        match t {
            // proto_ip (12) / proto_ip6 (13), the daddr field (12 / 9)
            KeyType::Ipv4Addr => (7, u32s(&[12, 12])),
            KeyType::Ipv6Addr => (7, u32s(&[13, 9])),
            // meta l4proto
            KeyType::InetProto => (9, u32s(&[expr::META_L4PROTO])),
            // nft's proto_tcp (8), proto_udp (6), proto_sctp (10); the dport field (2)
            KeyType::InetService => {
                let desc = match proto {
                    Protocol::Tcp => 8,
                    Protocol::Udp => 6,
                    Protocol::Sctp => 10,
                };
                (7, u32s(&[desc, 2]))
            }
            KeyType::Draw => (
                23,
                u32s(&[expr::NG_RANDOM, ferry_plan::ir::TYPEOF_DRAWS, 0]),
            ),
        }
    };
    let member = |(t, data): (u32, Vec<u8>)| [tlv(0, &t.to_ne_bytes()), tlv(1, &data)].concat();
    let members: Vec<u8> = fields
        .iter()
        .enumerate()
        .flat_map(|(i, f)| tlv(i as u8, &member(expr(*f))))
        .collect();
    // The concatenation (13) of the members.
    tlv(kind, &member((13, members)))
}

// ---- expressions ----

mod expr {
    // nft_meta keys, nft_ct keys, payload bases, cmp ops, nat types, reject types.
    pub const META_MARK: u32 = 3;
    pub const META_IIFNAME: u32 = 6;
    pub const FIB_RESULT_ADDRTYPE: u32 = 3;
    pub const FIB_F_SADDR: u32 = 1;
    pub const RTN_LOCAL: u32 = 2;
    pub const META_NFPROTO: u32 = 15;
    pub const META_L4PROTO: u32 = 16;
    pub const CT_STATE: u32 = 0;
    pub const CT_STATUS: u32 = 2;
    pub const CT_PROTO_DST: u32 = 12;
    pub const CT_DST_IP: u32 = 20;
    pub const CT_DST_IP6: u32 = 22;
    pub const DYNSET_OP_UPDATE: u32 = 1;
    pub const BASE_NETWORK: u32 = 1;
    pub const BASE_TRANSPORT: u32 = 2;
    pub const CMP_EQ: u32 = 0;
    pub const CMP_NEQ: u32 = 1;
    pub const NAT_DNAT: u32 = 1;
    pub const NG_RANDOM: u32 = 1;
    pub const LOOKUP_F_INV: u32 = 1;
    pub const REJECT_TCP_RST: u32 = 1;
    pub const REJECT_ICMPX_UNREACH: u32 = 2;
    pub const REJECT_ICMPX_PORT_UNREACH: u8 = 1;
    pub const CT_STATE_NEW: u32 = 8;
    pub const IPS_DST_NAT: u32 = 0x20;
    pub const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
    pub const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
}

/// Rule encoding: the writer, the sets created in this batch (for their IDs), and what the
/// rule has established so far (nft adds `meta nfproto` before the first `ip`/`ip6` field).
struct RuleCtx<'a> {
    w: &'a mut Writer,
    set_ids: &'a std::collections::BTreeMap<String, u32>,
    family: Option<Family>,
    /// The IDs of the anonymous sets written for this rule, in the order it uses them.
    anonymous: std::collections::VecDeque<u32>,
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => 2,
        Family::V6 => 10,
    }
}

fn addr_len(f: Family) -> u32 {
    match f {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

/// Offsets of the source and destination address in the network header.
fn addr_offset(f: Family, source: bool) -> u32 {
    match (f, source) {
        (Family::V4, true) => 12,
        (Family::V4, false) => 16,
        (Family::V6, true) => 8,
        (Family::V6, false) => 24,
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl RuleCtx<'_> {
    fn meta(&mut self, key: u32, dreg: u32) -> Result<(), Unsupported> {
        self.w.expr("meta", |w| {
            w.be32(1, dreg);
            w.be32(2, key);
            Ok(())
        })
    }

    fn cmp(&mut self, op: u32, value: &[u8]) -> Result<(), Unsupported> {
        self.w.expr("cmp", |w| {
            w.be32(1, REG_1);
            w.be32(2, op);
            w.data(3, value)
        })
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32, dreg: u32) -> Result<(), Unsupported> {
        self.w.expr("payload", |w| {
            w.be32(1, dreg);
            w.be32(2, base);
            w.be32(3, offset);
            w.be32(4, len);
            Ok(())
        })
    }

    fn bitwise(&mut self, mask: &[u8], xor: &[u8]) -> Result<(), Unsupported> {
        self.w.expr("bitwise", |w| {
            w.be32(1, REG_1);
            w.be32(2, REG_1);
            w.be32(3, mask.len() as u32);
            w.data(4, mask)?;
            w.data(5, xor)
        })
    }

    fn lookup(&mut self, set: &str, dreg: Option<u32>, invert: bool) -> Result<(), Unsupported> {
        let id = self.set_ids.get(set).copied();
        self.w.expr("lookup", |w| {
            w.str(1, set);
            w.be32(2, REG_1);
            if let Some(d) = dreg {
                w.be32(3, d);
            }
            if let Some(id) = id {
                w.be32(4, id);
            }
            if invert {
                w.be32(5, expr::LOOKUP_F_INV);
            }
            Ok(())
        })
    }

    /// A lookup in the next anonymous set written for this rule.
    fn lookup_anonymous(&mut self, invert: bool) -> Result<(), Unsupported> {
        let id = self
            .anonymous
            .pop_front()
            .ok_or_else(|| Unsupported("an anonymous set not written".into()))?;
        self.w.expr("lookup", |w| {
            w.str(1, ANONYMOUS_SET);
            w.be32(2, REG_1);
            w.be32(4, id);
            if invert {
                w.be32(5, expr::LOOKUP_F_INV);
            }
            Ok(())
        })
    }

    /// `ct original KEY` into `dreg`.
    fn ct_original(&mut self, key: u32, dreg: u32) -> Result<(), Unsupported> {
        self.w.expr("ct", |w| {
            w.be32(1, dreg);
            w.be32(2, key);
            w.attr(3, &[0]);
            Ok(())
        })
    }

    fn immediate_value(&mut self, dreg: u32, value: &[u8]) -> Result<(), Unsupported> {
        self.w.expr("immediate", |w| {
            w.be32(1, dreg);
            w.data(2, value)
        })
    }

    /// `ip saddr|daddr [!=] PREFIX`, as nft loads it: the whole bytes of a byte-aligned
    /// prefix, else the address masked.
    fn prefix(&mut self, c: Cidr, source: bool, op: u32) -> Result<(), Unsupported> {
        let f = Family::of(c.network());
        self.family(f)?;
        let len = u32::from(c.prefix_len());
        let net = ip_bytes(c.network());
        if len == 0 {
            return Err(Unsupported(format!("a /0 prefix ({c})")));
        }
        if len % 8 == 0 {
            self.payload(expr::BASE_NETWORK, addr_offset(f, source), len / 8, REG_1)?;
            self.cmp(op, &net[..(len / 8) as usize])
        } else {
            self.addr(f, source, REG_1)?;
            let mut mask = vec![0u8; net.len()];
            for (i, b) in mask.iter_mut().enumerate() {
                let bits = len.saturating_sub(8 * i as u32).min(8);
                *b = (0xff00u16 >> bits) as u8;
            }
            self.bitwise(&mask, &vec![0; net.len()])?;
            self.cmp(op, &net)
        }
    }

    /// The whole source (or destination) address of family `f` into `dreg`.
    fn addr(&mut self, f: Family, source: bool, dreg: u32) -> Result<(), Unsupported> {
        self.payload(
            expr::BASE_NETWORK,
            addr_offset(f, source),
            addr_len(f),
            dreg,
        )
    }

    /// `meta nfproto ipv4|ipv6`, once per rule.
    fn family(&mut self, f: Family) -> Result<(), Unsupported> {
        match self.family {
            Some(known) if known == f => Ok(()),
            Some(_) => Err(Unsupported("ip and ip6 matches in one rule".into())),
            None => {
                self.meta(expr::META_NFPROTO, REG_1)?;
                self.cmp(expr::CMP_EQ, &[nfproto(f)])?;
                self.family = Some(f);
                Ok(())
            }
        }
    }

    /// `ip daddr . meta l4proto . th dport` into REG_1 and the registers after it.
    fn service_tuple(&mut self, f: Family) -> Result<(), Unsupported> {
        self.family(f)?;
        self.addr(f, false, REG_1)?;
        let w = addr_len(f) / 4;
        self.meta(expr::META_L4PROTO, reg_at(w))?;
        self.payload(expr::BASE_TRANSPORT, 2, 2, reg_at(w + 1))
    }

    fn matches(&mut self, m: &Match) -> Result<(), Unsupported> {
        match m {
            Match::CtStateNew | Match::CtStatusDnat => {
                let (key, bit) = if *m == Match::CtStateNew {
                    (expr::CT_STATE, expr::CT_STATE_NEW)
                } else {
                    (expr::CT_STATUS, expr::IPS_DST_NAT)
                };
                self.w.expr("ct", |w| {
                    w.be32(1, REG_1);
                    w.be32(2, key);
                    Ok(())
                })?;
                self.bitwise(&bit.to_ne_bytes(), &[0; 4])?;
                self.cmp(expr::CMP_NEQ, &[0; 4])
            }
            Match::L4Proto(p) => {
                self.meta(expr::META_L4PROTO, REG_1)?;
                self.cmp(expr::CMP_EQ, &[proto_number(*p)])
            }
            Match::SaddrNotInAny(cs) if cs.len() == 1 => self.matches(&Match::SaddrNotIn(cs[0])),
            Match::SaddrNotInAny(cs) => {
                let f = cs
                    .first()
                    .map(|c| Family::of(c.network()))
                    .ok_or_else(|| Unsupported("ip saddr != { } (no prefix)".into()))?;
                self.family(f)?;
                self.addr(f, true, REG_1)?;
                self.lookup_anonymous(true)
            }
            Match::SaddrNotIn(c) => self.prefix(*c, true, expr::CMP_NEQ),
            Match::SaddrIn(c) => self.prefix(*c, true, expr::CMP_EQ),
            Match::DaddrIn(c) => self.prefix(*c, false, expr::CMP_EQ),
            Match::IifName {
                name,
                prefix,
                negate,
            } => {
                // The whole 16-byte name (NUL-padded), or only a prefix's bytes.
                let mut value = name.as_bytes().to_vec();
                if value.is_empty() || value.len() > 15 {
                    return Err(Unsupported(format!("iifname {name:?}")));
                }
                if !*prefix {
                    value.resize(16, 0);
                }
                self.meta(expr::META_IIFNAME, REG_1)?;
                let op = if *negate { expr::CMP_NEQ } else { expr::CMP_EQ };
                self.cmp(op, &value)
            }
            Match::DaddrNotInSet(f, s) => {
                self.family(*f)?;
                self.addr(*f, false, REG_1)?;
                self.lookup(s, None, true)
            }
            Match::FibSaddrLocal => {
                self.w.expr("fib", |w| {
                    w.be32(1, REG_1);
                    w.be32(2, expr::FIB_RESULT_ADDRTYPE);
                    w.be32(3, expr::FIB_F_SADDR);
                    Ok(())
                })?;
                self.cmp(expr::CMP_EQ, &expr::RTN_LOCAL.to_ne_bytes())
            }
            Match::DaddrInSet(f, s) => {
                self.family(*f)?;
                self.addr(*f, false, REG_1)?;
                self.lookup(s, None, false)
            }
            Match::ServiceTupleNotIn(f, s) => {
                self.service_tuple(*f)?;
                self.lookup(s, None, true)
            }
            Match::AddrPairInSet(f, s) => {
                self.family(*f)?;
                self.addr(*f, true, REG_1)?;
                let next = reg_at(addr_len(*f) / 4);
                self.addr(*f, false, next)?;
                self.lookup(s, None, false)
            }
            Match::Random { modulus, value } => {
                self.w.expr("numgen", |w| {
                    w.be32(1, REG_1);
                    w.be32(2, *modulus);
                    w.be32(3, expr::NG_RANDOM);
                    Ok(())
                })?;
                self.cmp(expr::CMP_EQ, &value.to_ne_bytes())
            }
            Match::MarkHas(bits) | Match::MarkLacks(bits) => {
                self.meta(expr::META_MARK, REG_1)?;
                self.bitwise(&bits.to_ne_bytes(), &[0; 4])?;
                let want = if matches!(m, Match::MarkHas(_)) {
                    *bits
                } else {
                    0
                };
                self.cmp(expr::CMP_EQ, &want.to_ne_bytes())
            }
        }
    }

    fn action(&mut self, a: &Action) -> Result<(), Unsupported> {
        match a {
            Action::Verdict(v) => self.w.expr("immediate", |w| {
                w.be32(1, REG_VERDICT);
                w.verdict(2, v)
            }),
            Action::ServiceTupleVmap(f, map) => {
                self.service_tuple(*f)?;
                self.lookup(map, Some(REG_VERDICT), false)
            }
            Action::ProtoPortVmap(map) => {
                self.meta(expr::META_L4PROTO, REG_1)?;
                self.payload(expr::BASE_TRANSPORT, 2, 2, reg_at(1))?;
                self.lookup(map, Some(REG_VERDICT), false)
            }
            Action::SetMark(bits) | Action::ToggleMark(bits) => {
                self.meta(expr::META_MARK, REG_1)?;
                let mask = if matches!(a, Action::SetMark(_)) {
                    !bits
                } else {
                    u32::MAX
                };
                self.bitwise(&mask.to_ne_bytes(), &bits.to_ne_bytes())?;
                self.w.expr("meta", |w| {
                    w.be32(2, expr::META_MARK);
                    w.be32(3, REG_1);
                    Ok(())
                })
            }
            Action::Dnat { addr, port } => {
                self.immediate_value(REG_1, &ip_bytes(*addr))?;
                self.immediate_value(REG_2, &port.to_be_bytes())?;
                let family = match addr {
                    IpAddr::V4(_) => 2,
                    IpAddr::V6(_) => 10,
                };
                self.w.expr("nat", |w| {
                    w.be32(1, expr::NAT_DNAT);
                    w.be32(2, family);
                    w.be32(3, REG_1);
                    w.be32(5, REG_2);
                    w.be32(7, expr::NF_NAT_RANGE_PROTO_SPECIFIED);
                    Ok(())
                })
            }
            Action::Masquerade { fully_random } => self.w.expr("masq", |w| {
                if *fully_random {
                    w.be32(1, expr::NF_NAT_RANGE_PROTO_RANDOM_FULLY);
                }
                Ok(())
            }),
            Action::RejectTcpReset => self.w.expr("reject", |w| {
                w.be32(1, expr::REJECT_TCP_RST);
                w.attr(2, &[0]);
                Ok(())
            }),
            Action::RejectIcmpx => self.w.expr("reject", |w| {
                w.be32(1, expr::REJECT_ICMPX_UNREACH);
                w.attr(2, &[expr::REJECT_ICMPX_PORT_UNREACH]);
                Ok(())
            }),
            Action::DnatRemembered { family, map, port } => {
                let f = *family;
                self.family(f)?;
                self.addr(f, true, REG_1)?;
                self.lookup(map, Some(REG_1), false)?;
                let proto_reg = match port {
                    Some(p) => {
                        self.immediate_value(REG_2, &p.to_be_bytes())?;
                        REG_2
                    }
                    // The map holds address . port: the port sits after the address.
                    None => reg_at(addr_len(f) / 4),
                };
                let explicit = port.is_some();
                self.w.expr("nat", |w| {
                    w.be32(1, expr::NAT_DNAT);
                    w.be32(2, u32::from(nfproto(f)));
                    w.be32(3, REG_1);
                    w.be32(5, proto_reg);
                    if explicit {
                        w.be32(7, expr::NF_NAT_RANGE_PROTO_SPECIFIED);
                    }
                    Ok(())
                })
            }
            Action::DnatDraw {
                family,
                map,
                modulus,
                nodeport,
                ..
            } => {
                let f = *family;
                // ip daddr . tcp dport . numgen random mod N (or without the address), as nft
                // lays them out: the fields in consecutive 4-byte words from REG_1 (the
                // protocol is the rule's `meta l4proto` match, before).
                let mut word = 0;
                if !*nodeport {
                    self.family(f)?;
                    self.addr(f, false, REG_1)?;
                    word = addr_len(f) / 4;
                }
                self.payload(expr::BASE_TRANSPORT, 2, 2, reg_at(word))?;
                let draw = reg_at(word + 1);
                let m = *modulus;
                self.w.expr("numgen", |w| {
                    w.be32(1, draw);
                    w.be32(2, m);
                    w.be32(3, expr::NG_RANDOM);
                    Ok(())
                })?;
                self.lookup(map, Some(REG_1), false)?;
                // The map's data: the address, then the port in the word after it.
                let proto_reg = reg_at(addr_len(f) / 4);
                self.w.expr("nat", |w| {
                    w.be32(1, expr::NAT_DNAT);
                    w.be32(2, u32::from(nfproto(f)));
                    w.be32(3, REG_1);
                    w.be32(5, proto_reg);
                    Ok(())
                })
            }
            Action::OriginalTupleVmap(f, map) => {
                // meta l4proto { tcp, udp, sctp }
                self.meta(expr::META_L4PROTO, REG_1)?;
                self.lookup_anonymous(false)?;
                // ct original ip daddr . meta l4proto . ct original proto-dst
                let (key, words) = match f {
                    Family::V4 => (expr::CT_DST_IP, 1),
                    Family::V6 => (expr::CT_DST_IP6, 4),
                };
                self.ct_original(key, REG_1)?;
                self.meta(expr::META_L4PROTO, reg_at(words))?;
                self.ct_original(expr::CT_PROTO_DST, reg_at(words + 1))?;
                self.lookup(map, Some(REG_VERDICT), false)
            }
            Action::Remember {
                family,
                map,
                timeout,
                with_port,
            } => {
                let f = *family;
                self.family(f)?;
                self.addr(f, true, REG_1)?;
                self.addr(f, false, REG_2)?;
                if *with_port {
                    self.payload(expr::BASE_TRANSPORT, 2, 2, reg_at(4 + addr_len(f) / 4))?;
                }
                let id = self.set_ids.get(&**map).copied();
                let ms = u64::from(*timeout) * 1000;
                self.w.expr("dynset", |w| {
                    w.str(1, map);
                    if let Some(id) = id {
                        w.be32(2, id);
                    }
                    w.be32(3, expr::DYNSET_OP_UPDATE);
                    w.be32(4, REG_1);
                    w.be32(5, REG_2);
                    w.attr(6, &ms.to_be_bytes());
                    Ok(())
                })
            }
        }
    }
}

// ---- sets and elements ----

fn type_id(k: KeyType) -> u32 {
    match k {
        KeyType::Ipv4Addr => 7,
        KeyType::Ipv6Addr => 8,
        KeyType::InetProto => 12,
        KeyType::InetService => 13,
        // nft's TYPE_INTEGER: what `numgen` yields.
        KeyType::Draw => 4,
    }
}

fn width(k: KeyType) -> usize {
    match k {
        KeyType::Ipv4Addr => 4,
        KeyType::Ipv6Addr => 16,
        KeyType::InetProto => 1,
        KeyType::InetService => 2,
        KeyType::Draw => 4,
    }
}

/// A key's bytes: the fields in their registers (4-byte aligned) when concatenated.
fn key_bytes(types: &[KeyType], key: &[Value]) -> Result<Vec<u8>, Unsupported> {
    if types.len() != key.len() {
        return Err(Unsupported(format!(
            "a key of {} fields for {types:?}",
            key.len()
        )));
    }
    let mut out = Vec::new();
    for (t, v) in types.iter().zip(key) {
        let bytes = match (t, v) {
            (KeyType::Ipv4Addr | KeyType::Ipv6Addr, Value::Ip(ip)) => ip_bytes(*ip),
            (KeyType::InetProto, Value::Proto(p)) => vec![proto_number(*p)],
            (KeyType::InetService, Value::Port(p)) => p.to_be_bytes().to_vec(),
            // numgen writes its number in the host's byte order.
            (KeyType::Draw, Value::Draw(d)) => d.to_ne_bytes().to_vec(),
            _ => return Err(Unsupported(format!("value {v} for a {t:?} field"))),
        };
        if bytes.len() != width(*t) {
            return Err(Unsupported(format!("value {v} for a {t:?} field")));
        }
        out.extend_from_slice(&bytes);
        if types.len() > 1 {
            out.resize((out.len() + 3) & !3, 0);
        }
    }
    Ok(out)
}

/// A planned element's key, typed (the planner writes keys that fit their set).
fn typed(s: &Set, key: &str) -> Result<Vec<Value>, Unsupported> {
    s.values(key)
        .ok_or_else(|| Unsupported(format!("element {key} does not fit set {}", s.name)))
}

/// An element's key bytes, whether it marks the end of a range, and the planned element.
type RawElement<'a> = (Vec<u8>, bool, &'a Element);

/// An interval set's elements as the kernel keeps them: a start element per range, an
/// end-marked element at the address after it (none when the range runs to the last address),
/// and the end marker nft puts at 0 when no range starts there.
fn interval_elements(set: &Set) -> Result<Vec<RawElement<'_>>, Unsupported> {
    let mut ranges = Vec::new();
    for (k, e) in &set.elements {
        let (a, b) = match set.values(k).as_deref() {
            Some([Value::Range(a, b)]) => (*a, *b),
            Some([Value::Ip(a)]) => (*a, *a),
            _ => return Err(Unsupported(format!("interval element {k}"))),
        };
        let e = &**e;
        ranges.push((ip_bytes(a), ip_bytes(b), e));
    }
    ranges.sort_by(|x, y| x.0.cmp(&y.0));
    let mut out = Vec::new();
    if let Some((first, _, e)) = ranges.first() {
        if first.iter().any(|b| *b != 0) {
            out.push((vec![0; first.len()], true, *e));
        }
    }
    for (a, b, e) in ranges {
        out.push((a, false, e));
        if let Some(next) = plus_one(&b) {
            out.push((next, true, e));
        }
    }
    Ok(out)
}

/// The big-endian number one more than `v`; None past the last.
fn plus_one(v: &[u8]) -> Option<Vec<u8>> {
    let mut out = v.to_vec();
    for b in out.iter_mut().rev() {
        if *b < 0xff {
            *b += 1;
            return Some(out);
        }
        *b = 0;
    }
    None
}

// ---- the batch ----

/// The batch that replaces ferry's table with `rs` in one transaction (`replace`: the table
/// exists and is deleted first), and the number of messages in it besides the batch markers.
pub fn full_load(rs: &Ruleset, replace: bool) -> Result<Vec<u8>, Unsupported> {
    batch(&[(rs, &[Op::Full { replace }])])
}

/// One batch (one transaction: all or nothing) of the steps for several tables: each planned
/// table `rs` (named by [`Ruleset::table_name`]) with the differ's [`Op`]s for it (a lone
/// [`Op::Full`] loads it whole). A sharded layout changes its tables atomically this way.
pub fn batch(parts: &[(&Ruleset, &[Op])]) -> Result<Vec<u8>, Unsupported> {
    // Sized up front (~350 bytes a rule, ~110 an element, ~200 a chain, measured at 10,000
    // services): a growing buffer would copy itself and hold twice its size at the peak.
    let mut cap = 4096;
    for (rs, ops) in parts {
        if let [Op::Full { .. }] = ops {
            let rules: usize = rs.chains.values().map(|c| c.rules.len()).sum();
            let element_count: usize = rs.sets.values().map(|s| s.elements.len()).sum();
            cap += rules * 350 + element_count * 110 + rs.chains.len() * 200;
        }
    }
    let mut w = Writer {
        buf: Vec::with_capacity(cap),
        ..Writer::default()
    };
    let b = w.msg_start(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES);
    w.msg_end(b);
    for (rs, ops) in parts {
        w.table = rs.table.as_deref().unwrap_or("").to_string();
        if let [Op::Full { replace }] = ops {
            full_body(&mut w, rs, *replace)?;
        } else {
            changes_body(&mut w, rs, ops)?;
        }
    }
    let e = w.msg_start(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES);
    w.msg_end(e);
    Ok(w.buf)
}

/// One step of a transaction over several tables (see [`steps`]).
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// The differ's [`Op`]s for the planned table (a lone [`Op::Full`] loads it whole).
    Ops(&'a Ruleset, &'a [Op]),
    /// Creates the planned table, empty (its objects follow, in this batch or later ones).
    CreateTable(&'a Ruleset),
    /// Deletes a table, whatever it holds.
    DeleteTable(&'a str),
}

/// One batch (one transaction) of [`Step`]s, in order: what [`batch`] does, plus creating and
/// deleting whole tables (a cold load in chunks creates a table first and fills it over several
/// transactions; a layout with fewer shards deletes the tables it no longer uses).
pub fn steps(steps: &[Step<'_>]) -> Result<Vec<u8>, Unsupported> {
    let mut w = Writer::default();
    let b = w.msg_start(NFNL_MSG_BATCH_BEGIN, 0, 0, NFNL_SUBSYS_NFTABLES);
    w.msg_end(b);
    for step in steps {
        match step {
            Step::Ops(rs, ops) => {
                w.table = rs.table.as_deref().unwrap_or("").to_string();
                if let [Op::Full { replace }] = ops {
                    full_body(&mut w, rs, *replace)?;
                } else {
                    changes_body(&mut w, rs, ops)?;
                }
            }
            Step::CreateTable(rs) => {
                w.table = rs.table.as_deref().unwrap_or("").to_string();
                new_table(&mut w);
            }
            Step::DeleteTable(name) => {
                w.table = name.to_string();
                let m = w.nft_msg(NFT_MSG_DELTABLE, 0);
                w.table_attr(NFTA_TABLE_NAME);
                w.msg_end(m);
            }
        }
    }
    let e = w.msg_start(NFNL_MSG_BATCH_END, 0, 0, NFNL_SUBSYS_NFTABLES);
    w.msg_end(e);
    Ok(w.buf)
}

/// The NEWTABLE message of the writer's table.
fn new_table(w: &mut Writer) {
    let m = w.nft_msg(NFT_MSG_NEWTABLE, NLM_F_CREATE);
    w.table_attr(NFTA_TABLE_NAME);
    w.be32(NFTA_TABLE_FLAGS, 0);
    w.attr(
        NFTA_TABLE_USERDATA,
        &comment_udata(UDATA_COMMENT, "managed by ferry"),
    );
    w.msg_end(m);
}

fn full_body(w: &mut Writer, rs: &Ruleset, replace: bool) -> Result<(), Unsupported> {
    if replace {
        let m = w.nft_msg(NFT_MSG_DELTABLE, 0);
        w.table_attr(NFTA_TABLE_NAME);
        w.msg_end(m);
    }
    new_table(w);

    let base = w.ids_used;
    let mut set_ids = std::collections::BTreeMap::new();
    for (i, s) in rs.sets.values().enumerate() {
        let id = base + i as u32 + 1;
        set_ids.insert(s.name.clone(), id);
        set_def(w, s, id)?;
    }
    for c in rs.chains.values() {
        chain_def(w, c);
    }
    let mut next_id = base + rs.sets.len() as u32;
    for c in rs.chains.values() {
        chain_rules(w, &set_ids, &mut next_id, c)?;
    }
    for s in rs.sets.values().filter(|s| !s.dynamic) {
        elements(w, s, set_ids[&s.name], None)?;
    }
    w.ids_used = next_id;
    Ok(())
}

/// Bytes a key or data of these fields takes (each field in a 4-byte register when more than
/// one).
fn fields_len(fields: &[KeyType]) -> usize {
    if fields.len() > 1 {
        fields.iter().map(|k| (width(*k) + 3) & !3).sum()
    } else {
        fields.iter().map(|k| width(*k)).sum()
    }
}

fn fields_type(fields: &[KeyType]) -> u32 {
    fields.iter().fold(0u32, |t, k| (t << 6) | type_id(*k))
}

/// All rules of `c`, the first with the chain's fingerprint in its comment (as
/// [`Chain::render_rules`] writes them).
fn chain_rules(
    w: &mut Writer,
    set_ids: &std::collections::BTreeMap<String, u32>,
    next_id: &mut u32,
    c: &Chain,
) -> Result<(), Unsupported> {
    let fp = c.fingerprint();
    for (i, r) in c.rules.iter().enumerate() {
        let comment = if i == 0 {
            Some(fp.in_comment(r.comment.as_deref()))
        } else {
            r.comment.as_deref().map(str::to_string)
        };
        rule(w, set_ids, next_id, &c.name, r, comment.as_deref())?;
    }
    Ok(())
}

/// The batch for a differ's [`Changes`](ferry_plan::Changes): its [`Op`]s, in order, with the
/// objects taken from the planned table `rs`.
pub fn changes(rs: &Ruleset, ops: &[Op]) -> Result<Vec<u8>, Unsupported> {
    batch(&[(rs, ops)])
}

fn changes_body(w: &mut Writer, rs: &Ruleset, ops: &[Op]) -> Result<(), Unsupported> {
    let missing = |what: &str, name: &str| Unsupported(format!("{what} {name} is not planned"));
    // Sets created in this batch are named by ID too; anonymous ones are numbered after them.
    let mut set_ids = std::collections::BTreeMap::new();
    for op in ops {
        if let Op::AddSet(name) = op {
            let id = w.ids_used + set_ids.len() as u32 + 1;
            set_ids.insert(name.clone(), id);
        }
    }
    let mut next_id = w.ids_used + set_ids.len() as u32;
    for op in ops {
        match op {
            Op::Full { .. } => return Err(Unsupported("a full load among other steps".into())),
            Op::AddSet(name) => {
                let s = rs.sets.get(name).ok_or_else(|| missing("set", name))?;
                set_def(w, s, set_ids[name])?;
            }
            Op::AddChain(name) => {
                let c = rs.chains.get(name).ok_or_else(|| missing("chain", name))?;
                chain_def(w, c);
            }
            Op::AddRules(name) => {
                let c = rs.chains.get(name).ok_or_else(|| missing("chain", name))?;
                chain_rules(w, &set_ids, &mut next_id, c)?;
            }
            Op::FlushChain(name) => {
                let m = w.nft_msg(NFT_MSG_DELRULE, 0);
                w.table_attr(NFTA_RULE_TABLE);
                w.str(NFTA_RULE_CHAIN, name);
                w.msg_end(m);
            }
            Op::AddElements(name, keys) => {
                let s = rs.sets.get(name).ok_or_else(|| missing("set", name))?;
                elements(w, s, set_ids.get(name).copied().unwrap_or(0), Some(keys))?;
            }
            Op::DeleteElements(name, keys) => {
                let s = rs.sets.get(name).ok_or_else(|| missing("set", name))?;
                delete_elements(w, s, keys)?;
            }
            Op::DeleteSet(name) => {
                let m = w.nft_msg(NFT_MSG_DELSET, 0);
                w.table_attr(NFTA_SET_TABLE);
                w.str(NFTA_SET_NAME, name);
                w.msg_end(m);
            }
            Op::DeleteChain(name) => {
                let m = w.nft_msg(NFT_MSG_DELCHAIN, 0);
                w.table_attr(NFTA_CHAIN_TABLE);
                w.str(NFTA_CHAIN_NAME, name);
                w.msg_end(m);
            }
        }
    }
    w.ids_used = next_id;
    Ok(())
}

/// Tests only: adds, before the batch's end, the deletion of a chain that does not exist, which
/// the kernel refuses (and with it the whole batch).
#[doc(hidden)]
pub fn spoil(batch: &mut Vec<u8>) {
    let end = batch.split_off(batch.len().saturating_sub(20));
    let mut w = Writer {
        buf: std::mem::take(batch),
        seq: 1_000_000,
        ..Writer::default()
    };
    let m = w.nft_msg(NFT_MSG_DELCHAIN, 0);
    w.table_attr(NFTA_CHAIN_TABLE);
    w.str(NFTA_CHAIN_NAME, "no-such-chain-ferry-test");
    w.msg_end(m);
    *batch = w.buf;
    batch.extend_from_slice(&end);
}

/// A key read back as text (`10.96.0.10 . tcp . 80`, `10.0.0.0-10.0.0.255`) as the values of
/// the set's fields.
fn parse_key(types: &[KeyType], interval: bool, text: &str) -> Result<Vec<Value>, Unsupported> {
    let bad = || Unsupported(format!("key {text:?} for {types:?}"));
    if interval {
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let b: IpAddr = b.trim().parse().map_err(|_| bad())?;
        return Ok(vec![Value::Range(a, b)]);
    }
    let parts: Vec<&str> = text.split(" . ").collect();
    if parts.len() != types.len() {
        return Err(bad());
    }
    types
        .iter()
        .zip(parts)
        .map(|(t, p)| match t {
            KeyType::Ipv4Addr | KeyType::Ipv6Addr => p.parse().map(Value::Ip).map_err(|_| bad()),
            KeyType::InetService => p.parse().map(Value::Port).map_err(|_| bad()),
            KeyType::Draw => p.parse().map(Value::Draw).map_err(|_| bad()),
            KeyType::InetProto => match p {
                "tcp" => Ok(Value::Proto(Protocol::Tcp)),
                "udp" => Ok(Value::Proto(Protocol::Udp)),
                "sctp" => Ok(Value::Proto(Protocol::Sctp)),
                _ => Err(bad()),
            },
        })
        .collect()
}

/// Deletes elements by key text: each key's element, and for a range its end marker.
fn delete_elements(w: &mut Writer, s: &Set, keys: &[String]) -> Result<(), Unsupported> {
    let mut raw: Vec<(Vec<u8>, bool)> = Vec::new();
    for k in keys {
        let key = parse_key(&s.key, s.interval, k)?;
        if s.interval {
            let [Value::Range(a, b)] = key.as_slice() else {
                return Err(Unsupported(format!("range {k}")));
            };
            raw.push((ip_bytes(*a), false));
            if let Some(n) = plus_one(&ip_bytes(*b)) {
                raw.push((n, true));
            }
        } else {
            raw.push((key_bytes(&s.key, &key)?, false));
        }
    }
    let mut it = raw.into_iter().peekable();
    while it.peek().is_some() {
        let m = w.nft_msg(NFT_MSG_DELSETELEM, 0);
        w.table_attr(NFTA_SET_ELEM_LIST_TABLE);
        w.str(NFTA_SET_ELEM_LIST_SET, &s.name);
        let els = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        while w.buf.len() - els < MAX_ATTR - 1024 {
            let Some((key, end)) = it.next() else {
                break;
            };
            let one = w.nest(NFTA_LIST_ELEM);
            w.data(NFTA_SET_ELEM_KEY, &key)?;
            if end {
                w.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            w.nest_end(one)?;
        }
        w.nest_end(els)?;
        w.msg_end(m);
    }
    Ok(())
}

fn set_def(w: &mut Writer, s: &Set, id: u32) -> Result<(), Unsupported> {
    if !s.data.is_empty() && !s.dynamic && s.typeof_text().is_none() {
        return Err(Unsupported(format!("map {} to data", s.name)));
    }
    let m = w.nft_msg(NFT_MSG_NEWSET, NLM_F_CREATE);
    w.table_attr(NFTA_SET_TABLE);
    w.str(NFTA_SET_NAME, &s.name);
    let mut flags = 0;
    if s.is_map() {
        flags |= NFT_SET_MAP;
    }
    if s.interval {
        flags |= NFT_SET_INTERVAL;
    }
    if s.dynamic {
        flags |= NFT_SET_TIMEOUT | NFT_SET_EVAL;
    }
    w.be32(NFTA_SET_FLAGS, flags);
    w.be32(NFTA_SET_KEY_TYPE, fields_type(&s.key));
    w.be32(NFTA_SET_KEY_LEN, fields_len(&s.key) as u32);
    if s.is_vmap {
        w.be32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        w.be32(NFTA_SET_DATA_LEN, 0);
    } else if !s.data.is_empty() {
        w.be32(NFTA_SET_DATA_TYPE, fields_type(&s.data));
        w.be32(NFTA_SET_DATA_LEN, fields_len(&s.data) as u32);
    }
    w.be32(NFTA_SET_ID, id);
    w.attr(NFTA_SET_USERDATA, &set_udata(s));
    w.msg_end(m);
    Ok(())
}

/// A set's userdata as nft writes it: byte orders, the `typeof` of endpoint maps, the comment.
fn set_udata(s: &Set) -> Vec<u8> {
    let mut udata = Vec::new();
    let byteorder = if s.key.len() == 1 && s.key[0] != KeyType::InetProto {
        BYTEORDER_BIG_ENDIAN
    } else {
        0
    };
    udata.extend_from_slice(&[UDATA_SET_KEYBYTEORDER, 4]);
    udata.extend_from_slice(&byteorder.to_ne_bytes());
    if s.is_map() {
        let data_order = if s.data.len() == 1 && s.data[0] != KeyType::InetProto {
            BYTEORDER_BIG_ENDIAN
        } else {
            0
        };
        udata.extend_from_slice(&[UDATA_SET_DATABYTEORDER, 4]);
        udata.extend_from_slice(&data_order.to_ne_bytes());
    }
    if let (Some(_), Some(proto)) = (s.typeof_text(), s.proto) {
        udata.extend(typeof_udata(UDATA_SET_KEY_TYPEOF, &s.key, proto));
        udata.extend(typeof_udata(UDATA_SET_DATA_TYPEOF, &s.data, proto));
        udata.extend(tlv(UDATA_SET_DATA_INTERVAL, &0u32.to_ne_bytes()));
    }
    if !s.comment.is_empty() {
        udata.extend(comment_udata(UDATA_SET_COMMENT, &s.comment));
    }
    udata
}

fn chain_def(w: &mut Writer, c: &Chain) {
    let m = w.nft_msg(NFT_MSG_NEWCHAIN, NLM_F_CREATE);
    w.table_attr(NFTA_CHAIN_TABLE);
    w.str(NFTA_CHAIN_NAME, &c.name);
    if let Some(BaseChain {
        type_,
        hook,
        priority,
    }) = c.base
    {
        let h = w.nest(NFTA_CHAIN_HOOK);
        let num = match hook {
            Hook::Prerouting => 0,
            Hook::Output => 3,
            Hook::Postrouting => 4,
        };
        w.be32(NFTA_HOOK_HOOKNUM, num);
        w.be32(NFTA_HOOK_PRIORITY, priority as u32);
        // A hook nest is a few bytes: never too long.
        let _ = w.nest_end(h);
        w.be32(NFTA_CHAIN_POLICY, 1);
        w.str(
            NFTA_CHAIN_TYPE,
            match type_ {
                ChainType::Filter => "filter",
                ChainType::Nat => "nat",
            },
        );
    }
    w.attr(
        NFTA_CHAIN_USERDATA,
        &comment_udata(UDATA_COMMENT, &c.comment),
    );
    w.msg_end(m);
}

/// The name the kernel numbers for an anonymous set.
const ANONYMOUS_SET: &str = "__set%d";
const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;

/// An anonymous set: its key type, whether it holds intervals, and its elements' keys (with
/// whether each marks the end of a range).
type AnonymousSet = (KeyType, bool, Vec<(Vec<u8>, bool)>);

/// The anonymous sets a rule needs, in the order it uses them: each as its key type and its
/// elements (interval elements when `interval`).
fn anonymous_sets(r: &Rule) -> Vec<AnonymousSet> {
    let mut out = Vec::new();
    for m in &r.matches {
        if let Match::SaddrNotInAny(cs) = m {
            if cs.len() > 1 {
                let f = Family::of(cs[0].network());
                let mut ranges: Vec<(Vec<u8>, Vec<u8>)> = cs
                    .iter()
                    .map(|c| {
                        let first = ip_bytes(c.network());
                        let mut last = first.clone();
                        let host = last.len() as u32 * 8 - u32::from(c.prefix_len());
                        for (i, b) in last.iter_mut().rev().enumerate() {
                            let bits = host.saturating_sub(8 * i as u32).min(8);
                            *b |= ((1u16 << bits) - 1) as u8;
                        }
                        (first, last)
                    })
                    .collect();
                ranges.sort();
                // Overlapping prefixes become one range, as nft merges them.
                let mut merged: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                for (a, b) in ranges {
                    match merged.last_mut() {
                        Some((_, end)) if a <= *end || plus_one(end).as_ref() == Some(&a) => {
                            if b > *end {
                                *end = b;
                            }
                        }
                        _ => merged.push((a, b)),
                    }
                }
                let mut els = Vec::new();
                if merged
                    .first()
                    .is_some_and(|(a, _)| a.iter().any(|x| *x != 0))
                {
                    els.push((vec![0; merged[0].0.len()], true));
                }
                for (a, b) in merged {
                    els.push((a, false));
                    if let Some(n) = plus_one(&b) {
                        els.push((n, true));
                    }
                }
                out.push((f.addr_type(), true, els));
            }
        }
    }
    if matches!(r.action, Action::OriginalTupleVmap(..)) {
        let protos = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
        let els = protos
            .iter()
            .map(|p| (vec![proto_number(*p)], false))
            .collect();
        out.push((KeyType::InetProto, false, els));
    }
    out
}

/// Writes an anonymous constant set and its elements; its ID.
fn anonymous_set(
    w: &mut Writer,
    id: u32,
    key: KeyType,
    interval: bool,
    els: &[(Vec<u8>, bool)],
) -> Result<(), Unsupported> {
    let m = w.nft_msg(NFT_MSG_NEWSET, NLM_F_CREATE);
    w.table_attr(NFTA_SET_TABLE);
    w.str(NFTA_SET_NAME, ANONYMOUS_SET);
    let mut flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT;
    if interval {
        flags |= NFT_SET_INTERVAL;
    }
    w.be32(NFTA_SET_FLAGS, flags);
    w.be32(NFTA_SET_KEY_TYPE, type_id(key));
    w.be32(NFTA_SET_KEY_LEN, width(key) as u32);
    w.be32(NFTA_SET_ID, id);
    let byteorder = if key == KeyType::InetProto {
        0
    } else {
        BYTEORDER_BIG_ENDIAN
    };
    let mut udata = vec![UDATA_SET_KEYBYTEORDER, 4];
    udata.extend_from_slice(&byteorder.to_ne_bytes());
    w.attr(NFTA_SET_USERDATA, &udata);
    w.msg_end(m);
    let m = w.nft_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE);
    w.table_attr(NFTA_SET_ELEM_LIST_TABLE);
    w.str(NFTA_SET_ELEM_LIST_SET, ANONYMOUS_SET);
    w.be32(NFTA_SET_ELEM_LIST_SET_ID, id);
    let list = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
    for (key, end) in els {
        let one = w.nest(NFTA_LIST_ELEM);
        w.data(NFTA_SET_ELEM_KEY, key)?;
        if *end {
            w.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
        }
        w.nest_end(one)?;
    }
    w.nest_end(list)?;
    w.msg_end(m);
    Ok(())
}

fn rule(
    w: &mut Writer,
    set_ids: &std::collections::BTreeMap<String, u32>,
    next_id: &mut u32,
    chain: &str,
    r: &Rule,
    comment: Option<&str>,
) -> Result<(), Unsupported> {
    let mut anonymous = std::collections::VecDeque::new();
    for (key, interval, els) in anonymous_sets(r) {
        *next_id += 1;
        anonymous_set(w, *next_id, key, interval, &els)?;
        anonymous.push_back(*next_id);
    }
    let m = w.nft_msg(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
    w.table_attr(NFTA_RULE_TABLE);
    w.str(NFTA_RULE_CHAIN, chain);
    let list = w.nest(NFTA_RULE_EXPRESSIONS);
    let mut ctx = RuleCtx {
        w: &mut *w,
        set_ids,
        family: None,
        anonymous,
    };
    for x in &r.matches {
        ctx.matches(x)?;
    }
    ctx.action(&r.action)?;
    w.nest_end(list)?;
    if let Some(c) = comment {
        w.attr(NFTA_RULE_USERDATA, &comment_udata(UDATA_COMMENT, c));
    }
    w.msg_end(m);
    Ok(())
}

/// The set's elements (all, or those of `only`'s keys), in messages whose element lists stay
/// under the attribute size limit; `id` 0 for a set that exists already.
fn elements(w: &mut Writer, s: &Set, id: u32, only: Option<&[String]>) -> Result<(), Unsupported> {
    let list: Vec<RawElement<'_>> = match only {
        None if s.interval => interval_elements(s)?,
        None => s
            .elements
            .iter()
            .map(|(k, e)| key_bytes(&s.key, &typed(s, k)?).map(|k| (k, false, &**e)))
            .collect::<Result<_, _>>()?,
        Some(keys) => {
            let mut out = Vec::new();
            for k in keys {
                let e: &Element = s.elements.get(k.as_str()).ok_or_else(|| {
                    Unsupported(format!("element {k} of {} is not planned", s.name))
                })?;
                let key = typed(s, k)?;
                if s.interval {
                    // A range, or a single address (a range of one).
                    let (a, b) = match key.as_slice() {
                        [Value::Range(a, b)] => (a, b),
                        [Value::Ip(a)] => (a, a),
                        _ => return Err(Unsupported(format!("range {k}"))),
                    };
                    out.push((ip_bytes(*a), false, e));
                    if let Some(n) = plus_one(&ip_bytes(*b)) {
                        out.push((n, true, e));
                    }
                } else {
                    out.push((key_bytes(&s.key, &key)?, false, e));
                }
            }
            out
        }
    };
    let mut it = list.into_iter().peekable();
    while it.peek().is_some() {
        let m = w.nft_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE);
        w.table_attr(NFTA_SET_ELEM_LIST_TABLE);
        w.str(NFTA_SET_ELEM_LIST_SET, &s.name);
        if id != 0 {
            w.be32(NFTA_SET_ELEM_LIST_SET_ID, id);
        }
        let els = w.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        // Room for one more element of at most ~600 bytes (a 16-byte key, a chain name and a
        // comment of at most 128 bytes each).
        while w.buf.len() - els < MAX_ATTR - 1024 {
            let Some((key, end, e)) = it.next() else {
                break;
            };
            let one = w.nest(NFTA_LIST_ELEM);
            w.data(NFTA_SET_ELEM_KEY, &key)?;
            if end {
                w.be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            } else {
                if let Some(v) = e.verdict() {
                    w.verdict(NFTA_SET_ELEM_DATA, v)?;
                }
                if let Some((addr, port)) = e.to() {
                    let data = key_bytes(&s.data, &[Value::Ip(addr), Value::Port(port)])?;
                    w.data(NFTA_SET_ELEM_DATA, &data)?;
                }
                if !e.comment.is_empty() {
                    w.attr(
                        NFTA_SET_ELEM_USERDATA,
                        &comment_udata(UDATA_COMMENT, &e.comment),
                    );
                }
            }
            w.nest_end(one)?;
        }
        w.nest_end(els)?;
        w.msg_end(m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{attrs, messages};

    /// The userdata nft 1.0.6 writes for `typeof` endpoint maps (captured with `strace -e
    /// sendmsg` of `nft -f`): `nft list` reads ferry's the same way.
    #[test]
    fn endpoint_maps_carry_their_typeof_as_nft_writes_it() {
        use ferry_plan::ir::Family;
        let hex = |s: &Set| {
            set_udata(s)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        // typeof ip daddr . tcp dport . numgen random mod 65536 : ip daddr . tcp dport
        let a = Set::endpoints("a", Family::V4, Protocol::Tcp, false, "");
        assert_eq!(
            hex(&a),
            "000400000000010400000000035000040d00000001480014000407000000010c00040c00000001040c0000000114000407000000010c000408000000010402000000021a0004170000000112000401000000010400000100020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c000408000000010402000000060400000000"
        );
        // typeof udp dport . numgen random mod 65536 : ip6 daddr . udp dport
        let b = Set::endpoints("b", Family::V6, Protocol::Udp, true, "");
        assert_eq!(
            hex(&b),
            "000400000000010400000000033a00040d00000001320014000407000000010c000406000000010402000000011a0004170000000112000401000000010400000100020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c000406000000010402000000060400000000"
        );
        // typeof ip6 daddr . sctp dport . numgen random mod 65536 : ip6 daddr . sctp dport,
        // comment "x y"
        let c = Set::endpoints("c", Family::V6, Protocol::Sctp, false, "x y");
        assert_eq!(
            hex(&c),
            "000400000000010400000000035000040d00000001480014000407000000010c00040d0000000104090000000114000407000000010c00040a000000010402000000021a0004170000000112000401000000010400000100020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c00040a000000010402000000060400000000070478207900"
        );
    }

    #[test]
    fn keys_sit_in_registers() {
        let k = key_bytes(
            &[KeyType::Ipv4Addr, KeyType::InetProto, KeyType::InetService],
            &[
                Value::Ip("10.96.0.10".parse().unwrap()),
                Value::Proto(Protocol::Tcp),
                Value::Port(80),
            ],
        )
        .unwrap();
        assert_eq!(k, [10, 96, 0, 10, 6, 0, 0, 0, 0, 80, 0, 0]);
        let one = key_bytes(&[KeyType::InetService], &[Value::Port(443)]).unwrap();
        assert_eq!(one, [1, 187]);
        assert!(key_bytes(&[KeyType::InetService], &[Value::Proto(Protocol::Udp)]).is_err());
    }

    #[test]
    fn ranges_become_start_and_end_elements() {
        let mut s = Set::ranges("pools", KeyType::Ipv4Addr, "");
        let ip = |t: &str| t.parse::<IpAddr>().unwrap();
        s.insert(
            vec![Value::Range(ip("10.0.0.0"), ip("10.0.0.255"))],
            None,
            String::new(),
        );
        s.insert(
            vec![Value::Range(ip("250.0.0.0"), ip("255.255.255.255"))],
            None,
            String::new(),
        );
        s.insert(
            vec![Value::Range(ip("10.0.3.3"), ip("10.0.3.3"))],
            None,
            String::new(),
        );
        let got: Vec<(Vec<u8>, bool)> = interval_elements(&s)
            .unwrap()
            .into_iter()
            .map(|(k, end, _)| (k, end))
            .collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 0, 0, 0], true),
                (vec![10, 0, 0, 0], false),
                (vec![10, 0, 1, 0], true),
                (vec![10, 0, 3, 3], false),
                (vec![10, 0, 3, 4], true),
                (vec![250, 0, 0, 0], false),
            ]
        );
    }

    #[test]
    fn a_batch_is_framed_and_every_message_parses() {
        let mut rs = Ruleset::default();
        let mut s = Set::new(
            "m",
            &[KeyType::InetProto, KeyType::InetService],
            true,
            "a map",
        );
        for p in 0..3000u16 {
            s.insert(
                vec![Value::Proto(Protocol::Tcp), Value::Port(p)],
                Some(Verdict::Accept),
                format!("element {p}"),
            );
        }
        rs.add_set(s);
        let mut c = Chain::new("c", "a chain");
        c.push(Rule::new(
            vec![Match::L4Proto(Protocol::Tcp)],
            Action::ProtoPortVmap("m".into()),
        ));
        rs.add_chain(c);
        let batch = full_load(&rs, true).unwrap();
        let msgs: Vec<_> = messages(&batch).collect();
        assert_eq!(msgs.first().map(|m| m.kind), Some(NFNL_MSG_BATCH_BEGIN));
        assert_eq!(msgs.last().map(|m| m.kind), Some(NFNL_MSG_BATCH_END));
        // Sequence numbers are distinct; the element lists were split under 64 KiB.
        let mut seqs: Vec<u32> = msgs.iter().map(|m| m.seq).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), msgs.len());
        let elem_msgs = msgs
            .iter()
            .filter(|m| m.kind == (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM))
            .count();
        assert!(elem_msgs > 1, "{elem_msgs}");
        let total: usize = msgs
            .iter()
            .filter(|m| m.kind == (NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM))
            .map(|m| {
                attrs(&m.payload[4..])
                    .filter(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
                    .map(|(_, v)| attrs(v).count())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(total, 3000);
    }
}
