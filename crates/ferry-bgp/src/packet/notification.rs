//! NOTIFICATION (RFC 4271 §4.5): error codes and subcodes as enums (RFC 4271 §6, RFC 4486
//! for Cease, RFC 6608 for FSM errors).

use std::fmt;

macro_rules! subcodes {
    ($(#[$m:meta])* $name:ident { $($v:ident = $n:expr),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($v),*, Other(u8) }
        impl $name {
            pub fn code(self) -> u8 {
                match self { $($name::$v => $n),*, $name::Other(n) => n }
            }
            pub fn from_code(n: u8) -> Self {
                match n { $($n => $name::$v),*, n => $name::Other(n) }
            }
        }
    };
}

subcodes!(
    /// Message Header Error subcodes.
    HeaderSubcode {
        Unspecific = 0,
        ConnectionNotSynchronized = 1,
        BadMessageLength = 2,
        BadMessageType = 3,
    }
);
subcodes!(
    /// OPEN Message Error subcodes.
    OpenSubcode {
        Unspecific = 0,
        UnsupportedVersion = 1,
        BadPeerAs = 2,
        BadBgpIdentifier = 3,
        UnsupportedOptionalParameter = 4,
        UnacceptableHoldTime = 6,
        UnsupportedCapability = 7,
    }
);
subcodes!(
    /// UPDATE Message Error subcodes.
    UpdateSubcode {
        Unspecific = 0,
        MalformedAttributeList = 1,
        UnrecognizedWellKnownAttribute = 2,
        MissingWellKnownAttribute = 3,
        AttributeFlagsError = 4,
        AttributeLengthError = 5,
        InvalidOrigin = 6,
        InvalidNextHop = 8,
        OptionalAttributeError = 9,
        InvalidNetworkField = 10,
        MalformedAsPath = 11,
    }
);
subcodes!(
    /// Finite State Machine Error subcodes (RFC 6608).
    FsmSubcode {
        Unspecific = 0,
        UnexpectedInOpenSent = 1,
        UnexpectedInOpenConfirm = 2,
        UnexpectedInEstablished = 3,
    }
);
subcodes!(
    /// Cease subcodes (RFC 4486).
    CeaseSubcode {
        Unspecific = 0,
        MaximumPrefixes = 1,
        AdministrativeShutdown = 2,
        PeerDeconfigured = 3,
        AdministrativeReset = 4,
        ConnectionRejected = 5,
        OtherConfigurationChange = 6,
        ConnectionCollisionResolution = 7,
        OutOfResources = 8,
        HardReset = 9,
    }
);

/// A NOTIFICATION's error code with its subcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Header(HeaderSubcode),
    Open(OpenSubcode),
    Update(UpdateSubcode),
    HoldTimerExpired,
    Fsm(FsmSubcode),
    Cease(CeaseSubcode),
    /// A code this speaker does not know.
    Other {
        code: u8,
        subcode: u8,
    },
}

impl ErrorKind {
    pub fn codes(self) -> (u8, u8) {
        match self {
            ErrorKind::Header(s) => (1, s.code()),
            ErrorKind::Open(s) => (2, s.code()),
            ErrorKind::Update(s) => (3, s.code()),
            ErrorKind::HoldTimerExpired => (4, 0),
            ErrorKind::Fsm(s) => (5, s.code()),
            ErrorKind::Cease(s) => (6, s.code()),
            ErrorKind::Other { code, subcode } => (code, subcode),
        }
    }

    pub fn from_codes(code: u8, subcode: u8) -> Self {
        match code {
            1 => ErrorKind::Header(HeaderSubcode::from_code(subcode)),
            2 => ErrorKind::Open(OpenSubcode::from_code(subcode)),
            3 => ErrorKind::Update(UpdateSubcode::from_code(subcode)),
            4 if subcode == 0 => ErrorKind::HoldTimerExpired,
            5 => ErrorKind::Fsm(FsmSubcode::from_code(subcode)),
            6 => ErrorKind::Cease(CeaseSubcode::from_code(subcode)),
            _ => ErrorKind::Other { code, subcode },
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Header(s) => write!(f, "message header error: {s:?}"),
            ErrorKind::Open(s) => write!(f, "OPEN message error: {s:?}"),
            ErrorKind::Update(s) => write!(f, "UPDATE message error: {s:?}"),
            ErrorKind::HoldTimerExpired => write!(f, "hold timer expired"),
            ErrorKind::Fsm(s) => write!(f, "finite state machine error: {s:?}"),
            ErrorKind::Cease(s) => write!(f, "cease: {s:?}"),
            ErrorKind::Other { code, subcode } => write!(f, "error code {code}/{subcode}"),
        }
    }
}

/// A NOTIFICATION message: the error and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub error: ErrorKind,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(error: ErrorKind) -> Self {
        Notification {
            error,
            data: Vec::new(),
        }
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        // RFC 8203: a shutdown communication is a length byte and UTF-8 text.
        if let ErrorKind::Cease(
            CeaseSubcode::AdministrativeShutdown | CeaseSubcode::AdministrativeReset,
        ) = self.error
        {
            if let Some((&n, text)) = self.data.split_first() {
                if usize::from(n) == text.len() {
                    if let Ok(t) = std::str::from_utf8(text) {
                        return write!(f, " \"{t}\"");
                    }
                }
            }
        }
        Ok(())
    }
}

/// The body (at least two bytes, the header check saw to that).
pub(super) fn decode(body: &[u8]) -> Notification {
    Notification {
        error: ErrorKind::from_codes(body[0], body[1]),
        data: body[2..].to_vec(),
    }
}
