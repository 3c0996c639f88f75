//! ARP for IPv4 over Ethernet (RFC 826).

use std::net::Ipv4Addr;

use super::{MacAddr, ParseError, Reader, ETHERTYPE_IPV4};

/// Length of an Ethernet/IPv4 ARP packet (without Ethernet padding).
pub const ARP_LEN: usize = 28;

const HTYPE_ETHERNET: u16 = 1;

/// The ARP operations this crate handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArpOperation {
    Request,
    Reply,
}

impl ArpOperation {
    fn code(self) -> u16 {
        match self {
            ArpOperation::Request => 1,
            ArpOperation::Reply => 2,
        }
    }
}

/// An ARP packet for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arp {
    pub operation: ArpOperation,
    pub sender_mac: MacAddr,
    pub sender_ip: Ipv4Addr,
    pub target_mac: MacAddr,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    /// Parses the ARP packet at the start of `bytes` (an Ethernet payload; padding ignored).
    pub fn parse(bytes: &[u8]) -> Result<Arp, ParseError> {
        let mut r = Reader::new(bytes);
        if r.u16("ARP header")? != HTYPE_ETHERNET {
            return Err(ParseError::Malformed("ARP: hardware type is not Ethernet"));
        }
        if r.u16("ARP header")? != ETHERTYPE_IPV4 {
            return Err(ParseError::Malformed("ARP: protocol type is not IPv4"));
        }
        if r.u8("ARP header")? != 6 || r.u8("ARP header")? != 4 {
            return Err(ParseError::Malformed(
                "ARP: address lengths are not 6 and 4",
            ));
        }
        let operation = match r.u16("ARP header")? {
            1 => ArpOperation::Request,
            2 => ArpOperation::Reply,
            _ => return Err(ParseError::Unsupported("ARP operation")),
        };
        Ok(Arp {
            operation,
            sender_mac: MacAddr(r.array("ARP addresses")?),
            sender_ip: Ipv4Addr::from(r.array::<4>("ARP addresses")?),
            target_mac: MacAddr(r.array("ARP addresses")?),
            target_ip: Ipv4Addr::from(r.array::<4>("ARP addresses")?),
        })
    }

    /// Appends the packet's [`ARP_LEN`] bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&HTYPE_ETHERNET.to_be_bytes());
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&[6, 4]);
        out.extend_from_slice(&self.operation.code().to_be_bytes());
        out.extend_from_slice(&self.sender_mac.0);
        out.extend_from_slice(&self.sender_ip.octets());
        out.extend_from_slice(&self.target_mac.0);
        out.extend_from_slice(&self.target_ip.octets());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;

    /// The ARP part of `arping -c 1 -i eth0 192.168.77.200` (Habets arping 2.23) from
    /// 02:00:00:00:00:02 / 192.168.77.2, captured with tcpdump.
    const REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 192,
        168, 77, 2, 0, 0, 0, 0, 0, 0, 192, 168, 77, 200,
    ];

    #[test]
    fn parses_a_known_request() {
        let arp = Arp::parse(&REQUEST).unwrap();
        assert_eq!(arp.operation, ArpOperation::Request);
        assert_eq!(arp.sender_mac.to_string(), "02:00:00:00:00:02");
        assert_eq!(arp.sender_ip, Ipv4Addr::new(192, 168, 77, 2));
        assert_eq!(arp.target_mac, MacAddr::ZERO);
        assert_eq!(arp.target_ip, Ipv4Addr::new(192, 168, 77, 200));
        let mut out = Vec::new();
        arp.emit(&mut out);
        assert_eq!(out, REQUEST);
    }

    #[test]
    fn rejects_bad_headers() {
        for n in 0..ARP_LEN {
            assert!(matches!(
                Arp::parse(&REQUEST[..n]),
                Err(ParseError::Truncated(_))
            ));
        }
        let mut bad = REQUEST;
        bad[1] = 6; // IEEE 802 hardware type
        assert!(Arp::parse(&bad).unwrap_err().is_garbage());
        let mut rarp = REQUEST;
        rarp[7] = 3;
        assert_eq!(
            Arp::parse(&rarp),
            Err(ParseError::Unsupported("ARP operation"))
        );
    }
}
