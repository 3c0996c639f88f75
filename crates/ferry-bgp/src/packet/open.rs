//! OPEN (RFC 4271 §4.2) with capabilities (RFC 5492): multiprotocol (RFC 4760), route refresh
//! (RFC 2918), graceful restart (RFC 4724), four-octet AS numbers (RFC 6793).

use std::net::Ipv4Addr;

use super::{DecodeError, ErrorKind, Family, OpenSubcode, Reader, AS_TRANS};

/// The graceful restart capability (RFC 4724 §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R: the sender has restarted (its peer should not wait for its End-of-RIB to send).
    pub restart_state: bool,
    /// N: graceful notification (RFC 8538); only carried.
    pub notification: bool,
    /// Seconds the peer should keep routes after the session drops (12 bits).
    pub restart_time: u16,
    /// The families whose routes are kept, each with F: forwarding state was preserved.
    pub families: Vec<(Family, bool)>,
}

/// One capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1 (RFC 4760). AFI/SAFI pairs this speaker does not know are [`Capability::Unknown`].
    Multiprotocol(Family),
    /// Code 2 (RFC 2918).
    RouteRefresh,
    /// Code 64 (RFC 4724).
    GracefulRestart(GracefulRestart),
    /// Code 65 (RFC 6793): the real AS number.
    FourOctetAs(u32),
    /// Anything else, carried as is.
    Unknown { code: u8, value: Vec<u8> },
}

/// An OPEN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The two-octet My Autonomous System field ([`AS_TRANS`] for a four-octet AS).
    pub my_as: u16,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// An OPEN for `asn`: My AS is [`AS_TRANS`] when the AS does not fit two octets, and the
    /// four-octet AS capability always carries the real one.
    pub fn new(asn: u32, hold_time: u16, router_id: Ipv4Addr, mut caps: Vec<Capability>) -> Self {
        caps.push(Capability::FourOctetAs(asn));
        Open {
            my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
            hold_time,
            router_id,
            capabilities: caps,
        }
    }

    /// The sender's AS: the four-octet capability's when present, else My AS.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }

    pub fn route_refresh(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::RouteRefresh))
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
    }

    /// The families the sender offers: its multiprotocol capabilities, or IPv4 unicast alone
    /// when it sent none (RFC 4760 §8).
    pub fn families(&self) -> Vec<Family> {
        let mut any_mp = false;
        let mut out = Vec::new();
        for c in &self.capabilities {
            match c {
                Capability::Multiprotocol(f) => {
                    any_mp = true;
                    if !out.contains(f) {
                        out.push(*f);
                    }
                }
                Capability::Unknown { code: 1, .. } => any_mp = true,
                _ => {}
            }
        }
        if !any_mp {
            out.push(Family::Ipv4Unicast);
        }
        out
    }
}

fn err(sub: OpenSubcode, data: Vec<u8>, what: impl Into<String>) -> DecodeError {
    DecodeError::new(ErrorKind::Open(sub), data, what)
}

pub(super) fn decode(body: &[u8]) -> Result<Open, DecodeError> {
    let mut r = Reader::new(body);
    let short = || err(OpenSubcode::Unspecific, Vec::new(), "OPEN is too short");
    let version = r.u8().ok_or_else(short)?;
    if version != 4 {
        // The data is the highest version this speaker supports.
        return Err(err(
            OpenSubcode::UnsupportedVersion,
            vec![0, 4],
            format!("BGP version {version}"),
        ));
    }
    let my_as = r.u16().ok_or_else(short)?;
    let hold_time = r.u16().ok_or_else(short)?;
    if hold_time == 1 || hold_time == 2 {
        return Err(err(
            OpenSubcode::UnacceptableHoldTime,
            Vec::new(),
            format!("hold time {hold_time} s (0 or at least 3)"),
        ));
    }
    let id = r.u32().ok_or_else(short)?;
    if id == 0 {
        return Err(err(
            OpenSubcode::BadBgpIdentifier,
            Vec::new(),
            "BGP identifier 0.0.0.0",
        ));
    }
    let opt_len = usize::from(r.u8().ok_or_else(short)?);
    if r.len() != opt_len {
        return Err(err(
            OpenSubcode::Unspecific,
            Vec::new(),
            format!(
                "optional parameters length {opt_len} but {} bytes follow",
                r.len()
            ),
        ));
    }
    let mut capabilities = Vec::new();
    while !r.is_empty() {
        let bad = || {
            err(
                OpenSubcode::Unspecific,
                Vec::new(),
                "optional parameter overruns the OPEN",
            )
        };
        let ty = r.u8().ok_or_else(bad)?;
        let len = usize::from(r.u8().ok_or_else(bad)?);
        let value = r.take(len).ok_or_else(bad)?;
        if ty != 2 {
            return Err(err(
                OpenSubcode::UnsupportedOptionalParameter,
                Vec::new(),
                format!("optional parameter type {ty}"),
            ));
        }
        let mut c = Reader::new(value);
        while !c.is_empty() {
            let bad = || {
                err(
                    OpenSubcode::Unspecific,
                    Vec::new(),
                    "capability overruns its parameter",
                )
            };
            let code = c.u8().ok_or_else(bad)?;
            let clen = usize::from(c.u8().ok_or_else(bad)?);
            let v = c.take(clen).ok_or_else(bad)?;
            capabilities.push(capability(code, v)?);
        }
    }
    Ok(Open {
        my_as,
        hold_time,
        router_id: Ipv4Addr::from(id),
        capabilities,
    })
}

fn capability(code: u8, v: &[u8]) -> Result<Capability, DecodeError> {
    let bad = |what: &str| {
        err(
            OpenSubcode::Unspecific,
            Vec::new(),
            format!("capability {code}: {what}"),
        )
    };
    Ok(match code {
        1 => {
            if v.len() != 4 {
                return Err(bad("length is not 4"));
            }
            let afi = u16::from_be_bytes([v[0], v[1]]);
            match Family::from_afi_safi(afi, v[3]) {
                Some(f) => Capability::Multiprotocol(f),
                None => Capability::Unknown {
                    code,
                    value: v.to_vec(),
                },
            }
        }
        2 if v.is_empty() => Capability::RouteRefresh,
        2 => return Err(bad("length is not 0")),
        64 => {
            let mut r = Reader::new(v);
            let head = r.u16().ok_or_else(|| bad("shorter than 2"))?;
            if !r.len().is_multiple_of(4) {
                return Err(bad("families are not 4 bytes each"));
            }
            let mut families = Vec::new();
            while let (Some(afi), Some(safi), Some(flags)) = (r.u16(), r.u8(), r.u8()) {
                if let Some(f) = Family::from_afi_safi(afi, safi) {
                    families.push((f, flags & 0x80 != 0));
                }
            }
            Capability::GracefulRestart(GracefulRestart {
                restart_state: head & 0x8000 != 0,
                notification: head & 0x4000 != 0,
                restart_time: head & 0x0fff,
                families,
            })
        }
        65 => {
            if v.len() != 4 {
                return Err(bad("length is not 4"));
            }
            Capability::FourOctetAs(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        }
        _ => Capability::Unknown {
            code,
            value: v.to_vec(),
        },
    })
}

pub(super) fn encode(o: &Open, out: &mut Vec<u8>) {
    out.push(4);
    out.extend_from_slice(&o.my_as.to_be_bytes());
    out.extend_from_slice(&o.hold_time.to_be_bytes());
    out.extend_from_slice(&o.router_id.octets());
    // One optional parameter per capability (as BIRD and most speakers do): each stays under
    // 255 bytes however many there are.
    let mut params = Vec::new();
    for c in &o.capabilities {
        let mut v = Vec::new();
        let code = match c {
            Capability::Multiprotocol(f) => {
                let (afi, safi) = f.afi_safi();
                v.extend_from_slice(&afi.to_be_bytes());
                v.push(0);
                v.push(safi);
                1
            }
            Capability::RouteRefresh => 2,
            Capability::GracefulRestart(g) => {
                let mut head = g.restart_time & 0x0fff;
                if g.restart_state {
                    head |= 0x8000;
                }
                if g.notification {
                    head |= 0x4000;
                }
                v.extend_from_slice(&head.to_be_bytes());
                for (f, fwd) in &g.families {
                    let (afi, safi) = f.afi_safi();
                    v.extend_from_slice(&afi.to_be_bytes());
                    v.push(safi);
                    v.push(if *fwd { 0x80 } else { 0 });
                }
                64
            }
            Capability::FourOctetAs(a) => {
                v.extend_from_slice(&a.to_be_bytes());
                65
            }
            Capability::Unknown { code, value } => {
                v.extend_from_slice(value);
                *code
            }
        };
        // A capability longer than 253 bytes cannot be said; none this crate builds is.
        let Ok(clen) = u8::try_from(v.len()) else {
            continue;
        };
        let Some(plen) = clen.checked_add(2) else {
            continue;
        };
        if params.len() + 2 + usize::from(plen) > 255 {
            break;
        }
        params.push(2);
        params.push(plen);
        params.push(code);
        params.push(clen);
        params.extend_from_slice(&v);
    }
    out.push(params.len() as u8);
    out.extend_from_slice(&params);
}
