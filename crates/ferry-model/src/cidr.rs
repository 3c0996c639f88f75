//! A small IPv4/IPv6 prefix type.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {input:?}: {reason}")]
pub struct CidrError {
    pub input: String,
    pub reason: &'static str,
}

impl Cidr {
    /// A prefix; host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let bits = to_u128(addr) & mask(len, max);
        Some(Cidr {
            addr: from_u128(bits, addr.is_ipv4()),
            len,
        })
    }
    pub fn network(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix_len(&self) -> u8 {
        self.len
    }
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
    fn max_len(&self) -> u8 {
        if self.is_ipv4() {
            32
        } else {
            128
        }
    }
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4()
            && to_u128(ip) & mask(self.len, self.max_len()) == to_u128(self.addr)
    }
    /// Number of addresses, saturating at u128::MAX.
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(self.max_len() - self.len);
        if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        }
    }
    /// The address at `offset` from the network address (None past the end).
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        if offset >= self.size() {
            return None;
        }
        Some(from_u128(to_u128(self.addr) + offset, self.is_ipv4()))
    }
    /// Offset of `ip` inside this prefix.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        self.contains(ip).then(|| to_u128(ip) - to_u128(self.addr))
    }
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.is_ipv4() == other.is_ipv4()
            && (self.contains(other.addr) || other.contains(self.addr))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = |reason| CidrError {
            input: s.to_string(),
            reason,
        };
        let (a, l) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| err("missing /length"))?;
        let addr: IpAddr = a.parse().map_err(|_| err("not an IP address"))?;
        let len: u8 = l
            .parse()
            .map_err(|_| err("prefix length is not a number"))?;
        Cidr::new(addr, len).ok_or_else(|| err("prefix length too long"))
    }
}

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

fn mask(len: u8, max: u8) -> u128 {
    let len = u32::from(len);
    let max = u32::from(max);
    if len == 0 {
        0
    } else {
        let ones = (!0u128) << (128 - len);
        ones >> (128 - max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_contains_nth() {
        let c: Cidr = "10.43.0.0/16".parse().unwrap();
        assert!(c.contains("10.43.7.203".parse().unwrap()));
        assert!(!c.contains("10.44.0.1".parse().unwrap()));
        assert_eq!(c.size(), 65536);
        assert_eq!(c.nth(1), Some("10.43.0.1".parse().unwrap()));
        assert_eq!(c.nth(65536), None);
        assert_eq!(c.offset_of("10.43.1.2".parse().unwrap()), Some(258));
        let h: Cidr = "10.42.1.7/24".parse().unwrap();
        assert_eq!(h.to_string(), "10.42.1.0/24");
        let v6: Cidr = "fd00:43::/112".parse().unwrap();
        assert!(v6.contains("fd00:43::5".parse().unwrap()));
        assert!(!v6.contains("10.43.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("x/3".parse::<Cidr>().is_err());
        let all: Cidr = "::/0".parse().unwrap();
        assert_eq!(all.size(), u128::MAX);
    }
}
