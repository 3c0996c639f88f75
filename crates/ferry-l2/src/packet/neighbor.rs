//! What a frame means to a layer-2 responder: a question to answer ([`Solicitation`]), an
//! announcement ([`Announcement`]), and the frames a responder sends ([`Solicitation::reply`],
//! [`announce`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{
    solicited_node, Arp, ArpOperation, Frame, MacAddr, Ndp, NdpMessage, NeighborAdvertisement,
    Payload, ALL_NODES,
};

/// An ARP request a responder owning `target` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpSolicitation {
    pub target: Ipv4Addr,
    /// 0.0.0.0 for an RFC 5227 probe (someone checks whether `target` is in use).
    pub sender_ip: Ipv4Addr,
    /// The requester (from the ARP payload): the reply goes there.
    pub sender_mac: MacAddr,
    /// Broadcast, or a unicast MAC (a cache refresh sent to the MAC the requester has cached).
    pub eth_dst: MacAddr,
}

/// How a Neighbor Solicitation was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NsKind {
    /// To the target's solicited-node group: address resolution.
    Multicast,
    /// To the target address itself, at the MAC the sender has cached: a neighbour
    /// unreachability detection probe.
    Unicast,
    /// From the unspecified address to the solicited-node group: duplicate address detection.
    Dad,
}

/// A Neighbor Solicitation a responder owning `target` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsSolicitation {
    pub kind: NsKind,
    pub target: Ipv6Addr,
    /// `::` for [`NsKind::Dad`].
    pub sender_ip: Ipv6Addr,
    /// The Source Link-Layer Address option, or the Ethernet source without one.
    pub sender_mac: MacAddr,
    pub eth_dst: MacAddr,
}

/// A question about who has an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Solicitation {
    Arp(ArpSolicitation),
    Ns(NsSolicitation),
}

impl Solicitation {
    /// The address asked about.
    pub fn target(&self) -> IpAddr {
        match self {
            Solicitation::Arp(s) => IpAddr::V4(s.target),
            Solicitation::Ns(s) => IpAddr::V6(s.target),
        }
    }

    /// The Ethernet destination the question was sent to.
    pub fn eth_dst(&self) -> MacAddr {
        match self {
            Solicitation::Arp(s) => s.eth_dst,
            Solicitation::Ns(s) => s.eth_dst,
        }
    }

    /// True when a host with MAC `mac` should consider answering: the question was broadcast,
    /// multicast, or sent unicast to `mac` (not to another host's MAC).
    pub fn addressed_to(&self, mac: MacAddr) -> bool {
        let dst = self.eth_dst();
        dst.is_multicast() || dst == mac
    }

    /// The answer from `our_mac`, which owns the target: an ARP reply unicast to the
    /// requester; a solicited NA (override set) to the soliciting address, or for DAD an
    /// unsolicited one to all nodes.
    pub fn reply(&self, our_mac: MacAddr) -> Frame {
        match *self {
            Solicitation::Arp(s) => Frame {
                dst: s.sender_mac,
                src: our_mac,
                payload: Payload::Arp(Arp {
                    operation: ArpOperation::Reply,
                    sender_mac: our_mac,
                    sender_ip: s.target,
                    target_mac: s.sender_mac,
                    target_ip: s.sender_ip,
                }),
            },
            Solicitation::Ns(s) => {
                let dad = s.kind == NsKind::Dad;
                let (dst_ip, dst_mac) = if dad {
                    (ALL_NODES, MacAddr::ipv6_multicast(ALL_NODES))
                } else {
                    (s.sender_ip, s.sender_mac)
                };
                Frame {
                    dst: dst_mac,
                    src: our_mac,
                    payload: Payload::Ndp(Ndp {
                        src: s.target,
                        dst: dst_ip,
                        message: NdpMessage::Advertisement(NeighborAdvertisement {
                            router: false,
                            solicited: !dad,
                            override_flag: true,
                            target: s.target,
                            target_mac: Some(our_mac),
                        }),
                    }),
                }
            }
        }
    }
}

/// The form of an [`Announcement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnnouncementKind {
    /// Gratuitous ARP, request form: broadcast, sender IP = target IP.
    GratuitousArp,
    /// Unsolicited Neighbor Advertisement to ff02::1, override set, solicited clear.
    UnsolicitedNa,
}

/// "`ip` is at `mac`", told to everyone on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Announcement {
    pub kind: AnnouncementKind,
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// The announcement `mac` sends when it takes `ip` over: a gratuitous ARP request for IPv4, an
/// unsolicited NA (override set) to all nodes for IPv6.
pub fn announce(mac: MacAddr, ip: IpAddr) -> Frame {
    match ip {
        IpAddr::V4(ip) => Frame {
            dst: MacAddr::BROADCAST,
            src: mac,
            payload: Payload::Arp(Arp {
                operation: ArpOperation::Request,
                sender_mac: mac,
                sender_ip: ip,
                target_mac: MacAddr::ZERO,
                target_ip: ip,
            }),
        },
        IpAddr::V6(ip) => Frame {
            dst: MacAddr::ipv6_multicast(ALL_NODES),
            src: mac,
            payload: Payload::Ndp(Ndp {
                src: ip,
                dst: ALL_NODES,
                message: NdpMessage::Advertisement(NeighborAdvertisement {
                    router: false,
                    solicited: false,
                    override_flag: true,
                    target: ip,
                    target_mac: Some(mac),
                }),
            }),
        },
    }
}

/// An IPv4 address a host can own: not 0.0.0.0, broadcast, multicast or loopback.
fn ownable_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

/// An IPv6 address a host can own: not ::, multicast or loopback.
fn ownable_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
}

impl Frame {
    /// The question this frame asks, if it is a well-formed ARP request or NS that expects an
    /// answer from the target's owner. Not a solicitation: replies, advertisements, gratuitous
    /// ARP (sender = target), frames from a multicast or zero MAC, questions about addresses
    /// nobody can own, an NS to a group other than the target's solicited-node group, a
    /// unicast NS not sent to the target address, a DAD probe that carries a source
    /// link-layer address (RFC 4861 section 7.1.1).
    pub fn solicitation(&self) -> Option<Solicitation> {
        if !self.src.is_unicast() {
            return None;
        }
        match &self.payload {
            Payload::Arp(arp) => {
                let ok = arp.operation == ArpOperation::Request
                    && arp.sender_mac.is_unicast()
                    && arp.sender_ip != arp.target_ip
                    && ownable_v4(arp.target_ip)
                    && (self.dst.is_broadcast() || self.dst.is_unicast());
                ok.then_some(Solicitation::Arp(ArpSolicitation {
                    target: arp.target_ip,
                    sender_ip: arp.sender_ip,
                    sender_mac: arp.sender_mac,
                    eth_dst: self.dst,
                }))
            }
            Payload::Ndp(ndp) => {
                let NdpMessage::Solicitation(ns) = ndp.message else {
                    return None;
                };
                if !ownable_v6(ns.target) {
                    return None;
                }
                let kind = if ndp.src.is_unspecified() {
                    let ok = ndp.dst == solicited_node(ns.target)
                        && self.dst.is_multicast()
                        && ns.source_mac.is_none();
                    ok.then_some(NsKind::Dad)?
                } else if ndp.src.is_multicast() {
                    return None;
                } else if ndp.dst.is_multicast() {
                    let ok = ndp.dst == solicited_node(ns.target) && self.dst.is_multicast();
                    ok.then_some(NsKind::Multicast)?
                } else {
                    let ok = ndp.dst == ns.target && self.dst.is_unicast();
                    ok.then_some(NsKind::Unicast)?
                };
                let sender_mac = ns.source_mac.unwrap_or(self.src);
                sender_mac
                    .is_unicast()
                    .then_some(Solicitation::Ns(NsSolicitation {
                        kind,
                        target: ns.target,
                        sender_ip: ndp.src,
                        sender_mac,
                        eth_dst: self.dst,
                    }))
            }
        }
    }

    /// The announcement this frame makes, if it is a gratuitous ARP (request form, broadcast,
    /// sender IP = target IP) or an unsolicited NA (to ff02::1, override set, solicited clear).
    /// The MAC is the ARP sender / the NA's target link-layer address (else Ethernet source).
    pub fn announcement(&self) -> Option<Announcement> {
        match &self.payload {
            Payload::Arp(arp) => {
                let ok = arp.operation == ArpOperation::Request
                    && self.dst.is_broadcast()
                    && arp.sender_ip == arp.target_ip
                    && ownable_v4(arp.sender_ip)
                    && arp.sender_mac.is_unicast();
                ok.then_some(Announcement {
                    kind: AnnouncementKind::GratuitousArp,
                    ip: IpAddr::V4(arp.sender_ip),
                    mac: arp.sender_mac,
                })
            }
            Payload::Ndp(ndp) => {
                let NdpMessage::Advertisement(na) = ndp.message else {
                    return None;
                };
                let mac = na.target_mac.unwrap_or(self.src);
                let ok = ndp.dst == ALL_NODES
                    && self.dst.is_multicast()
                    && na.override_flag
                    && !na.solicited
                    && ownable_v6(na.target)
                    && mac.is_unicast();
                ok.then_some(Announcement {
                    kind: AnnouncementKind::UnsolicitedNa,
                    ip: IpAddr::V6(na.target),
                    mac,
                })
            }
        }
    }

    /// Any assertion "this IP is at this MAC" the frame makes, whatever its form: the sender
    /// of an ARP request or reply (unless 0.0.0.0), the target of any NA. A responder that
    /// sees another MAC claim an address it owns has found a conflict.
    pub fn claim(&self) -> Option<(IpAddr, MacAddr)> {
        match &self.payload {
            Payload::Arp(arp) => (ownable_v4(arp.sender_ip) && arp.sender_mac.is_unicast())
                .then_some((IpAddr::V4(arp.sender_ip), arp.sender_mac)),
            Payload::Ndp(ndp) => match ndp.message {
                NdpMessage::Advertisement(na) => {
                    let mac = na.target_mac.unwrap_or(self.src);
                    (ownable_v6(na.target) && mac.is_unicast())
                        .then_some((IpAddr::V6(na.target), mac))
                }
                NdpMessage::Solicitation(_) => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::super::NeighborSolicitation;
    use super::*;

    const US: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    const THEM: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn arp(dst: MacAddr, op: ArpOperation, sip: &str, tip: &str) -> Frame {
        Frame {
            dst,
            src: THEM,
            payload: Payload::Arp(Arp {
                operation: op,
                sender_mac: THEM,
                sender_ip: v4(sip),
                target_mac: MacAddr::ZERO,
                target_ip: v4(tip),
            }),
        }
    }

    fn ns(eth_dst: MacAddr, src: &str, dst: Ipv6Addr, target: &str, sll: bool) -> Frame {
        Frame {
            dst: eth_dst,
            src: THEM,
            payload: Payload::Ndp(Ndp {
                src: v6(src),
                dst,
                message: NdpMessage::Solicitation(NeighborSolicitation {
                    target: v6(target),
                    source_mac: sll.then_some(THEM),
                }),
            }),
        }
    }

    /// Every frame goes through bytes first: what the responder sees.
    fn wire(f: Frame) -> Frame {
        Frame::parse(&f.to_bytes()).unwrap()
    }

    #[test]
    fn arp_request_is_a_solicitation_and_the_reply_is_unicast() {
        let req = wire(arp(
            MacAddr::BROADCAST,
            ArpOperation::Request,
            "10.0.0.2",
            "10.0.0.200",
        ));
        let s = req.solicitation().unwrap();
        assert_eq!(s.target(), IpAddr::V4(v4("10.0.0.200")));
        assert!(s.addressed_to(US));
        let reply = wire(s.reply(US));
        assert_eq!((reply.dst, reply.src), (THEM, US));
        let Payload::Arp(a) = reply.payload else {
            panic!()
        };
        assert_eq!(a.operation, ArpOperation::Reply);
        assert_eq!((a.sender_mac, a.sender_ip), (US, v4("10.0.0.200")));
        assert_eq!((a.target_mac, a.target_ip), (THEM, v4("10.0.0.2")));
        assert_eq!(reply.claim(), Some((IpAddr::V4(v4("10.0.0.200")), US)));
        assert_eq!(reply.announcement(), None);

        // Unicast refresh to us: answer; to someone else: not ours to answer.
        let to_us = arp(US, ArpOperation::Request, "10.0.0.2", "10.0.0.200");
        assert!(to_us.solicitation().unwrap().addressed_to(US));
        let to_other = arp(
            MacAddr([2, 0, 0, 0, 0, 0xc]),
            ArpOperation::Request,
            "10.0.0.2",
            "10.0.0.200",
        );
        assert!(!to_other.solicitation().unwrap().addressed_to(US));

        // A probe is answered to 0.0.0.0 at the prober's MAC.
        let probe = arp(
            MacAddr::BROADCAST,
            ArpOperation::Request,
            "0.0.0.0",
            "10.0.0.200",
        );
        let Payload::Arp(a) = probe.solicitation().unwrap().reply(US).payload else {
            panic!()
        };
        assert_eq!(a.target_ip, v4("0.0.0.0"));
        assert_eq!(probe.claim(), None);
    }

    #[test]
    fn non_questions_are_not_solicitations() {
        let b = MacAddr::BROADCAST;
        for f in [
            arp(b, ArpOperation::Reply, "10.0.0.2", "10.0.0.200"),
            arp(b, ArpOperation::Request, "10.0.0.200", "10.0.0.200"),
            arp(b, ArpOperation::Request, "10.0.0.2", "0.0.0.0"),
            arp(b, ArpOperation::Request, "10.0.0.2", "224.0.0.1"),
            arp(
                MacAddr([1, 0, 0x5e, 0, 0, 1]),
                ArpOperation::Request,
                "10.0.0.2",
                "10.0.0.1",
            ),
        ] {
            assert_eq!(f.solicitation(), None, "{f:?}");
        }
        let mut from_multicast = arp(b, ArpOperation::Request, "10.0.0.2", "10.0.0.200");
        from_multicast.src = MacAddr([3, 0, 0, 0, 0, 1]);
        assert_eq!(from_multicast.solicitation(), None);
    }

    #[test]
    fn gratuitous_arp_round_trips() {
        let f = wire(announce(US, IpAddr::V4(v4("10.0.0.200"))));
        assert_eq!(
            f.announcement(),
            Some(Announcement {
                kind: AnnouncementKind::GratuitousArp,
                ip: IpAddr::V4(v4("10.0.0.200")),
                mac: US
            })
        );
        assert_eq!(f.solicitation(), None);
        assert_eq!(f.claim(), Some((IpAddr::V4(v4("10.0.0.200")), US)));
        assert_eq!(f.to_bytes().len(), 60);
    }

    #[test]
    fn neighbor_solicitations_of_each_kind() {
        let target = "fd00:77::200";
        let group = solicited_node(v6(target));
        let gmac = MacAddr::ipv6_multicast(group);

        let m = wire(ns(gmac, "fd00:77::2", group, target, true))
            .solicitation()
            .unwrap();
        let Solicitation::Ns(s) = m else { panic!() };
        assert_eq!((s.kind, s.sender_mac), (NsKind::Multicast, THEM));
        assert!(m.addressed_to(US));

        let u = wire(ns(US, "fd00:77::2", v6(target), target, false))
            .solicitation()
            .unwrap();
        let Solicitation::Ns(s) = u else { panic!() };
        assert_eq!(s.kind, NsKind::Unicast);
        assert_eq!(s.sender_mac, THEM, "no option: the Ethernet source");
        assert!(u.addressed_to(US));
        assert!(!u.addressed_to(MacAddr([2, 0, 0, 0, 0, 0xc])));

        let d = wire(ns(gmac, "::", group, target, false))
            .solicitation()
            .unwrap();
        let Solicitation::Ns(s) = d else { panic!() };
        assert_eq!(s.kind, NsKind::Dad);

        for bad in [
            ns(gmac, "::", group, target, true),
            ns(gmac, "fd00:77::2", ALL_NODES, target, true),
            ns(
                gmac,
                "fd00:77::2",
                solicited_node(v6("fd00::1")),
                target,
                true,
            ),
            ns(US, "fd00:77::2", v6("fd00:77::201"), target, true),
            ns(gmac, "fd00:77::2", v6(target), target, true),
            ns(US, "fd00:77::2", group, target, true),
            ns(gmac, "ff02::1", group, target, true),
            ns(
                gmac,
                "fd00:77::2",
                solicited_node(v6("ff02::1")),
                "ff02::1",
                true,
            ),
        ] {
            assert_eq!(wire(bad).solicitation(), None, "{bad:?}");
        }
    }

    #[test]
    fn na_replies_follow_rfc_4861() {
        let target = "fd00:77::200";
        let group = solicited_node(v6(target));
        let gmac = MacAddr::ipv6_multicast(group);
        let s = ns(gmac, "fd00:77::2", group, target, true)
            .solicitation()
            .unwrap();
        let reply = wire(s.reply(US));
        assert_eq!((reply.dst, reply.src), (THEM, US));
        let Payload::Ndp(ndp) = reply.payload else {
            panic!()
        };
        assert_eq!((ndp.src, ndp.dst), (v6(target), v6("fd00:77::2")));
        let NdpMessage::Advertisement(na) = ndp.message else {
            panic!()
        };
        assert!(na.solicited && na.override_flag && !na.router);
        assert_eq!((na.target, na.target_mac), (v6(target), Some(US)));
        assert_eq!(reply.announcement(), None, "solicited: not an announcement");

        let dad = ns(gmac, "::", group, target, false).solicitation().unwrap();
        let reply = wire(dad.reply(US));
        assert_eq!(reply.dst.to_string(), "33:33:00:00:00:01");
        assert_eq!(
            reply.announcement().map(|a| (a.ip, a.mac)),
            Some((IpAddr::V6(v6(target)), US))
        );
    }

    #[test]
    fn unsolicited_na_round_trips() {
        let f = wire(announce(US, IpAddr::V6(v6("fd00:77::200"))));
        assert_eq!(f.dst.to_string(), "33:33:00:00:00:01");
        let a = f.announcement().unwrap();
        assert_eq!(a.kind, AnnouncementKind::UnsolicitedNa);
        assert_eq!((a.ip, a.mac), (IpAddr::V6(v6("fd00:77::200")), US));
        assert_eq!(f.solicitation(), None);
    }
}
