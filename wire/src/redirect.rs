//! The Redirect frame (broker to subscriber, in place of HelloOk): the position asked for is
//! older than this broker keeps, and the brokers named keep the topic on disk.
//!
//! ```text
//! offset size field
//!      0    2 count       1..=REDIRECT_BROKERS_MAX brokers
//!      2    6 reserved    0
//!      8  8*n brokers     each: the 4 octets of its IPv4 address, its port, its id
//! ```

use core::net::{Ipv4Addr, SocketAddrV4};

use crate::bytes::{first_non_zero, put, set_u16, u16_at};
use crate::error::Error;
use crate::hello::check_exact;

/// Size of the fixed part of a Redirect body.
pub const REDIRECT_FIXED_BYTES: usize = 8;
/// Size of one broker of a Redirect.
pub const REDIRECT_BROKER_BYTES: usize = 8;
/// Most brokers one Redirect names.
pub const REDIRECT_BROKERS_MAX: usize = 16;

mod field {
    pub const COUNT: usize = 0;
    pub const RESERVED: core::ops::Range<usize> = 2..8;
    pub const BROKERS: usize = 8;
    // Within a broker.
    pub const IP: usize = 0;
    pub const PORT: usize = 4;
    pub const ID: usize = 6;
}

/// A view over a Redirect body.
#[derive(Debug, Clone, Copy)]
pub struct Redirect<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Redirect<T> {
    /// Wraps a buffer without checks; accessors panic if it is too short.
    pub fn new_unchecked(buffer: T) -> Self {
        Redirect { buffer }
    }

    /// Wraps a body after [`check_len`](Self::check_len).
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let frame = Self::new_unchecked(buffer);
        frame.check_len()?;
        Ok(frame)
    }

    /// Checks that the body is exactly the fixed part plus `count` brokers.
    pub fn check_len(&self) -> Result<(), Error> {
        check_exact(
            self.buffer.as_ref().len(),
            REDIRECT_FIXED_BYTES,
            "redirect body",
            || usize::from(self.count()) * REDIRECT_BROKER_BYTES,
        )
    }

    /// How many brokers follow.
    pub fn count(&self) -> u16 {
        u16_at(self.buffer.as_ref(), field::COUNT)
    }

    /// The first non-zero reserved byte, if any (offset in the body, value).
    pub fn reserved_non_zero(&self) -> Option<(usize, u8)> {
        first_non_zero(self.buffer.as_ref(), field::RESERVED)
    }

    /// Broker `index` (below [`count`](Self::count)): its address and id.
    pub fn broker(&self, index: usize) -> (SocketAddrV4, u16) {
        let at = field::BROKERS + index * REDIRECT_BROKER_BYTES;
        let bytes = self.buffer.as_ref();
        let ip = Ipv4Addr::new(
            bytes[at + field::IP],
            bytes[at + field::IP + 1],
            bytes[at + field::IP + 2],
            bytes[at + field::IP + 3],
        );
        let port = u16_at(bytes, at + field::PORT);
        (SocketAddrV4::new(ip, port), u16_at(bytes, at + field::ID))
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Redirect<T> {
    /// Sets the count.
    pub fn set_count(&mut self, count: u16) {
        set_u16(self.buffer.as_mut(), field::COUNT, count);
    }

    /// Zeroes the reserved bytes.
    pub fn clear_reserved(&mut self) {
        self.buffer.as_mut()[field::RESERVED].fill(0);
    }

    /// Sets broker `index`.
    pub fn set_broker(&mut self, index: usize, addr: SocketAddrV4, id: u16) {
        let at = field::BROKERS + index * REDIRECT_BROKER_BYTES;
        let buffer = self.buffer.as_mut();
        put(buffer, at + field::IP, &addr.ip().octets());
        set_u16(buffer, at + field::PORT, addr.port());
        set_u16(buffer, at + field::ID, id);
    }
}

/// A parsed Redirect: the brokers to subscribe at instead, in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedirectRepr {
    brokers: Vec<(SocketAddrV4, u16)>,
}

impl RedirectRepr {
    /// A Redirect to `brokers` (address and id each): at least one, at most
    /// [`REDIRECT_BROKERS_MAX`] (more are left out).
    pub fn new(brokers: &[(SocketAddrV4, u16)]) -> Result<Self, Error> {
        if brokers.is_empty() {
            return Err(Self::count_error(0));
        }
        Ok(RedirectRepr {
            brokers: brokers[..brokers.len().min(REDIRECT_BROKERS_MAX)].to_vec(),
        })
    }

    fn count_error(count: usize) -> Error {
        Error::OutOfRange {
            field: "redirect count",
            value: count as u64,
            min: 1,
            max: REDIRECT_BROKERS_MAX as u64,
        }
    }

    /// Parses a checked Redirect view: 1 to [`REDIRECT_BROKERS_MAX`] brokers, none with port
    /// 0, reserved bytes zero.
    pub fn parse<T: AsRef<[u8]>>(frame: &Redirect<T>) -> Result<Self, Error> {
        let count = usize::from(frame.count());
        if !(1..=REDIRECT_BROKERS_MAX).contains(&count) {
            return Err(Self::count_error(count));
        }
        if let Some((_, value)) = frame.reserved_non_zero() {
            return Err(Error::NonZeroReserved {
                field: "redirect reserved",
                value: value.into(),
            });
        }
        let brokers: Vec<_> = (0..count).map(|i| frame.broker(i)).collect();
        if brokers.iter().any(|(addr, _)| addr.port() == 0) {
            return Err(Error::OutOfRange {
                field: "redirect port",
                value: 0,
                min: 1,
                max: u16::MAX.into(),
            });
        }
        Ok(RedirectRepr { brokers })
    }

    /// The brokers, each with its id, in the order to try them.
    pub fn brokers(&self) -> &[(SocketAddrV4, u16)] {
        &self.brokers
    }

    /// Length of the body.
    pub fn buffer_len(&self) -> usize {
        REDIRECT_FIXED_BYTES + self.brokers.len() * REDIRECT_BROKER_BYTES
    }

    /// Writes the body; the view must span [`buffer_len`](Self::buffer_len) bytes.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, frame: &mut Redirect<T>) {
        // At most REDIRECT_BROKERS_MAX, so the count fits.
        frame.set_count(self.brokers.len() as u16);
        frame.clear_reserved();
        for (index, (addr, id)) in self.brokers.iter().enumerate() {
            frame.set_broker(index, *addr, *id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 77, 1, last), port)
    }

    fn bytes(repr: &RedirectRepr) -> Vec<u8> {
        let mut bytes = vec![0xaa; repr.buffer_len()];
        repr.emit(&mut Redirect::new_unchecked(&mut bytes[..]));
        bytes
    }

    #[test]
    fn a_redirect_round_trips_with_its_brokers_in_order() {
        let repr = RedirectRepr::new(&[(addr(2, 9301), 1), (addr(4, 9303), 3)]).unwrap();
        let bytes = bytes(&repr);
        assert_eq!(bytes.len(), 8 + 2 * 8);
        assert_eq!(&bytes[..8], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[8..16], &[10, 77, 1, 2, 0x55, 0x24, 1, 0]);
        let parsed = RedirectRepr::parse(&Redirect::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(parsed, repr);
        assert_eq!(parsed.brokers()[1], (addr(4, 9303), 3));
    }

    #[test]
    fn malformed_redirects_are_refused() {
        let repr = RedirectRepr::new(&[(addr(2, 9301), 1)]).unwrap();
        let good = bytes(&repr);
        let parse =
            |bytes: &[u8]| Redirect::new_checked(bytes).and_then(|r| RedirectRepr::parse(&r));
        assert!(matches!(
            parse(&good[..12]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(parse(&good[..4]), Err(Error::Truncated { .. })));
        let mut none = good.clone();
        none[0] = 0;
        assert!(matches!(
            parse(&none[..8]),
            Err(Error::OutOfRange {
                field: "redirect count",
                ..
            })
        ));
        let mut reserved = good.clone();
        reserved[5] = 1;
        assert!(matches!(
            parse(&reserved),
            Err(Error::NonZeroReserved { .. })
        ));
        let mut port_zero = good.clone();
        port_zero[12..14].fill(0);
        assert!(matches!(
            parse(&port_zero),
            Err(Error::OutOfRange {
                field: "redirect port",
                ..
            })
        ));
        let too_many = vec![(addr(2, 9301), 1); REDIRECT_BROKERS_MAX + 1];
        assert_eq!(
            RedirectRepr::new(&too_many).unwrap().brokers().len(),
            REDIRECT_BROKERS_MAX
        );
        assert!(RedirectRepr::new(&[]).is_err());
    }
}
