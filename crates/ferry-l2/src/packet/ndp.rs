//! IPv6 neighbour discovery (RFC 4861): an IPv6 header carrying an ICMPv6 Neighbor
//! Solicitation or Neighbor Advertisement, with its link-layer address option.

use std::net::Ipv6Addr;

use super::{MacAddr, ParseError, Reader};

/// The IPv6 hop limit every NS/NA carries; anything else did not come from the link (RFC 4861
/// section 7.1) and is rejected.
pub const NDP_HOP_LIMIT: u8 = 255;
/// ff02::1, the all-nodes group unsolicited advertisements go to.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

const IPV6_HEADER_LEN: usize = 40;
const NEXT_HEADER_ICMPV6: u8 = 58;
const TYPE_NS: u8 = 135;
const TYPE_NA: u8 = 136;
/// Type, code, checksum, 4 bytes flags/reserved and the 16-byte target.
const NDP_BODY_LEN: usize = 24;
const OPT_SOURCE_LLADDR: u8 = 1;
const OPT_TARGET_LLADDR: u8 = 2;
const FLAG_ROUTER: u8 = 0x80;
const FLAG_SOLICITED: u8 = 0x40;
const FLAG_OVERRIDE: u8 = 0x20;

/// The solicited-node multicast group of `addr`: ff02::1:ff00:0/104 + its last 24 bits.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let [.., a, b, c] = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, a, b, c])
}

/// The ICMPv6 checksum (RFC 4443 section 2.3) of `message` sent from `src` to `dst`.
///
/// Over a message whose checksum field is zero this is the value to put there; over a message
/// with a correct checksum it is 0.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let mut sum = 0u64;
    sum = add_words(sum, &src.octets());
    sum = add_words(sum, &dst.octets());
    sum = add_words(sum, &len.to_be_bytes());
    sum = add_words(sum, &[0, 0, 0, NEXT_HEADER_ICMPV6]);
    sum = add_words(sum, message);
    while sum > 0xffff {
        sum = (sum & 0xffff).wrapping_add(sum >> 16);
    }
    !(sum as u16)
}

fn add_words(mut sum: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        if let [hi, lo] = *w {
            sum = sum.wrapping_add(u64::from(u16::from_be_bytes([hi, lo])));
        }
    }
    if let [last] = *words.remainder() {
        sum = sum.wrapping_add(u64::from(u16::from_be_bytes([last, 0])));
    }
    sum
}

/// An ICMPv6 Neighbor Solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NeighborSolicitation {
    pub target: Ipv6Addr,
    /// The Source Link-Layer Address option, when present (the first one, if repeated).
    pub source_mac: Option<MacAddr>,
}

/// An ICMPv6 Neighbor Advertisement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NeighborAdvertisement {
    /// R: the sender is a router.
    pub router: bool,
    /// S: sent in answer to a solicitation.
    pub solicited: bool,
    /// O: the advertisement should replace a cached link-layer address.
    pub override_flag: bool,
    pub target: Ipv6Addr,
    /// The Target Link-Layer Address option, when present (the first one, if repeated).
    pub target_mac: Option<MacAddr>,
}

/// The neighbour discovery messages this crate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdpMessage {
    Solicitation(NeighborSolicitation),
    Advertisement(NeighborAdvertisement),
}

/// An IPv6 packet carrying an NS or NA (hop limit 255, no extension headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ndp {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub message: NdpMessage,
}

impl Ndp {
    /// Parses the IPv6 packet at the start of `bytes` (an Ethernet payload; bytes after the
    /// IPv6 payload length are padding and ignored). Checks what RFC 4861 section 7.1 asks a
    /// receiver to check about the format: hop limit 255, ICMP code 0, length, checksum, no
    /// zero-length option.
    pub fn parse(bytes: &[u8]) -> Result<Ndp, ParseError> {
        let mut r = Reader::new(bytes);
        let [version_class, ..] = r.array::<4>("IPv6 header")?;
        let payload_len = usize::from(r.u16("IPv6 header")?);
        let next_header = r.u8("IPv6 header")?;
        let hop_limit = r.u8("IPv6 header")?;
        let src = Ipv6Addr::from(r.array::<16>("IPv6 header")?);
        let dst = Ipv6Addr::from(r.array::<16>("IPv6 header")?);
        if version_class >> 4 != 6 {
            return Err(ParseError::Malformed("IPv6: version is not 6"));
        }
        let icmp = r.take(payload_len, "IPv6 payload")?;
        if next_header != NEXT_HEADER_ICMPV6 {
            return Err(ParseError::Unsupported("IPv6 payload is not ICMPv6"));
        }
        let mut m = Reader::new(icmp);
        let kind = m.u8("ICMPv6 header")?;
        if kind != TYPE_NS && kind != TYPE_NA {
            return Err(ParseError::Unsupported("ICMPv6 type"));
        }
        if hop_limit != NDP_HOP_LIMIT {
            return Err(ParseError::Malformed("NDP: hop limit is not 255"));
        }
        if icmp.len() < NDP_BODY_LEN {
            return Err(ParseError::Truncated("NDP message"));
        }
        if m.u8("ICMPv6 header")? != 0 {
            return Err(ParseError::Malformed("NDP: ICMPv6 code is not 0"));
        }
        if icmpv6_checksum(src, dst, icmp) != 0 {
            return Err(ParseError::Checksum);
        }
        let _checksum = m.u16("ICMPv6 header")?;
        let [flags, ..] = m.array::<4>("NDP message")?;
        let target = Ipv6Addr::from(m.array::<16>("NDP message")?);
        let message = if kind == TYPE_NS {
            NdpMessage::Solicitation(NeighborSolicitation {
                target,
                source_mac: link_layer_option(m, OPT_SOURCE_LLADDR)?,
            })
        } else {
            NdpMessage::Advertisement(NeighborAdvertisement {
                router: flags & FLAG_ROUTER != 0,
                solicited: flags & FLAG_SOLICITED != 0,
                override_flag: flags & FLAG_OVERRIDE != 0,
                target,
                target_mac: link_layer_option(m, OPT_TARGET_LLADDR)?,
            })
        };
        Ok(Ndp { src, dst, message })
    }

    /// Appends the IPv6 packet (header, then the ICMPv6 message with its checksum) to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let mut icmp = Vec::with_capacity(NDP_BODY_LEN + 8);
        let (kind, flags, target, option) = match self.message {
            NdpMessage::Solicitation(ns) => (
                TYPE_NS,
                0,
                ns.target,
                ns.source_mac.map(|m| (OPT_SOURCE_LLADDR, m)),
            ),
            NdpMessage::Advertisement(na) => {
                let mut flags = 0;
                if na.router {
                    flags |= FLAG_ROUTER;
                }
                if na.solicited {
                    flags |= FLAG_SOLICITED;
                }
                if na.override_flag {
                    flags |= FLAG_OVERRIDE;
                }
                (
                    TYPE_NA,
                    flags,
                    na.target,
                    na.target_mac.map(|m| (OPT_TARGET_LLADDR, m)),
                )
            }
        };
        icmp.extend_from_slice(&[kind, 0, 0, 0, flags, 0, 0, 0]);
        icmp.extend_from_slice(&target.octets());
        if let Some((opt, mac)) = option {
            icmp.extend_from_slice(&[opt, 1]);
            icmp.extend_from_slice(&mac.0);
        }
        let checksum = icmpv6_checksum(self.src, self.dst, &icmp);
        if let Some(field) = icmp.get_mut(2..4) {
            field.copy_from_slice(&checksum.to_be_bytes());
        }
        let payload_len = u16::try_from(icmp.len()).unwrap_or(u16::MAX);
        out.reserve(IPV6_HEADER_LEN + icmp.len());
        out.extend_from_slice(&[0x60, 0, 0, 0]);
        out.extend_from_slice(&payload_len.to_be_bytes());
        out.extend_from_slice(&[NEXT_HEADER_ICMPV6, NDP_HOP_LIMIT]);
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        out.extend_from_slice(&icmp);
    }
}

/// Walks the options after an NS/NA body and returns the first Ethernet link-layer address
/// option of type `wanted`. Other options are skipped; a zero-length option is malformed.
fn link_layer_option(mut r: Reader<'_>, wanted: u8) -> Result<Option<MacAddr>, ParseError> {
    let mut found = None;
    while r.remaining() > 0 {
        let kind = r.u8("NDP option")?;
        let units = r.u8("NDP option")?;
        if units == 0 {
            return Err(ParseError::Malformed("NDP option of length 0"));
        }
        let body = r.take(usize::from(units) * 8 - 2, "NDP option")?;
        if kind == wanted {
            let mac = <[u8; 6]>::try_from(body)
                .map_err(|_| ParseError::Malformed("NDP link-layer address option length"))?;
            found = found.or(Some(MacAddr(mac)));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;

    /// A multicast NS for fe80::200 from fe80::1 (02:00:00:00:00:01): the IPv6 packet as
    /// `ndisc6 -s fe80::1 fe80::200 eth0` sent it (captured with tcpdump; the kernel set the
    /// flow label 0xbad1b and the checksum 0x769b).
    const NS: [u8; 72] = [
        0x60, 0x0b, 0xad, 0x1b, 0x00, 0x20, 0x3a, 0xff, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0x01, 0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0, 0x02, 0x00, 0x87,
        0x00, 0x76, 0x9b, 0, 0, 0, 0, 0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x00,
        0x01, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01,
    ];

    #[test]
    fn solicited_node_group() {
        assert_eq!(
            solicited_node("fd00:77::1:2:3:200".parse().unwrap()),
            "ff02::1:ff03:200".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn parses_a_known_solicitation_and_builds_it_back() {
        let ndp = Ndp::parse(&NS).unwrap();
        assert_eq!(ndp.src, "fe80::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ndp.dst, "ff02::1:ff00:200".parse::<Ipv6Addr>().unwrap());
        let NdpMessage::Solicitation(ns) = ndp.message else {
            panic!("not an NS: {ndp:?}")
        };
        assert_eq!(ns.target, "fe80::200".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ns.source_mac.unwrap().to_string(), "02:00:00:00:00:01");
        let mut out = Vec::new();
        ndp.emit(&mut out);
        assert_eq!(out[..1], [0x60], "no traffic class");
        assert_eq!(out[1..4], [0, 0, 0], "no flow label");
        assert_eq!(out[4..], NS[4..], "the same packet, checksum included");
    }

    #[test]
    fn rejects_what_rfc_4861_says_to_discard() {
        let mut hop = NS;
        hop[7] = 64;
        assert_eq!(
            Ndp::parse(&hop),
            Err(ParseError::Malformed("NDP: hop limit is not 255"))
        );
        let mut sum = NS;
        sum[42] ^= 1;
        assert_eq!(Ndp::parse(&sum), Err(ParseError::Checksum));
        let mut code = NS;
        code[41] = 1;
        assert!(Ndp::parse(&code).unwrap_err().is_garbage());
        let mut zero_opt = NS;
        zero_opt[65] = 0;
        assert!(Ndp::parse(&zero_opt).unwrap_err().is_garbage());
        for n in 0..NS.len() {
            assert!(Ndp::parse(&NS[..n]).unwrap_err().is_garbage(), "{n}");
        }
        let mut echo = NS;
        echo[40] = 128;
        assert_eq!(
            Ndp::parse(&echo),
            Err(ParseError::Unsupported("ICMPv6 type"))
        );
        let mut udp = NS;
        udp[6] = 17;
        assert!(!Ndp::parse(&udp).unwrap_err().is_garbage());
    }

    #[test]
    fn skips_unknown_options_and_takes_the_first_address() {
        let ndp = Ndp {
            src: "fd00::2".parse().unwrap(),
            dst: "fd00::1".parse().unwrap(),
            message: NdpMessage::Advertisement(NeighborAdvertisement {
                router: true,
                solicited: true,
                override_flag: false,
                target: "fd00::1".parse().unwrap(),
                target_mac: None,
            }),
        };
        let mut out = Vec::new();
        ndp.emit(&mut out);
        // A nonce option (type 14, 8 bytes), then two target link-layer address options.
        out.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
        out.extend_from_slice(&[2, 1, 2, 0, 0, 0, 0, 7]);
        out.extend_from_slice(&[2, 1, 2, 0, 0, 0, 0, 8]);
        out[5] += 24;
        out[42] = 0;
        out[43] = 0;
        let src = ndp.src;
        let dst = ndp.dst;
        let sum = icmpv6_checksum(src, dst, &out[40..]);
        out[42..44].copy_from_slice(&sum.to_be_bytes());
        let NdpMessage::Advertisement(na) = Ndp::parse(&out).unwrap().message else {
            panic!("not an NA")
        };
        assert!(na.router && na.solicited && !na.override_flag);
        assert_eq!(na.target_mac.unwrap().to_string(), "02:00:00:00:00:07");
    }
}
