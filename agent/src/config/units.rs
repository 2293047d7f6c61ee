//! Human units in config values: durations ("250ms", "30s"), byte sizes ("64KiB") and network
//! blocks ("10.0.0.0/8").

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written as a human string, e.g. `"250ms"`, `"30s"`, `"5m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

/// A byte size written as an integer or a human string, e.g. `65536`, `"64KiB"`, `"1MiB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// An IP network written as a CIDR block (`"10.0.0.0/8"`, `"::1/128"`) or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

// === impl Dur ===

impl Dur {
    /// The longest duration any key accepts: one day. Every duration of the agent (timeouts,
    /// intervals, TTLs, windows, ejection and open times) is minutes at most in practice; a
    /// longer value is a slip ("30d" for "30s"), and a bound here keeps every `Instant + Dur`
    /// and `Dur * n` on the request path far from overflow (a `Duration` of `u64::MAX` seconds
    /// added to an `Instant` panics). Central policies from the registry parse through here too.
    pub const MAX: Dur = Dur::secs(86_400);

    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    pub const fn millis(ms: u64) -> Self {
        Self(Duration::from_millis(ms))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"30s\" or \"5m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(v.trim())
                    .map_err(|e| E::custom(format_args!("invalid duration {v:?}: {e}")))?;
                if d > Dur::MAX.0 {
                    return Err(E::custom(format_args!(
                        "invalid duration {v:?}: more than {}, the longest any key accepts",
                        Dur::MAX
                    )));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_str(V)
    }
}

// === impl ByteSize ===

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "KB" | "k" => 1 << 10,
            "MiB" | "M" | "MB" => 1 << 20,
            "GiB" | "G" | "GB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 20 && n % (1 << 20) == 0 {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n % (1 << 10) == 0 {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 65536 or \"64KiB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

// === impl Cidr ===

impl Cidr {
    /// Parses `"a.b.c.d/n"`, `"x::y/n"` or a bare address (a block of one).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("invalid network {s:?}: expected an IP address or a CIDR block such as \"10.0.0.0/8\"")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid network {s:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// Whether `ip` is in the block; an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, what a
    /// dual-stack listener sees) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let whole = usize::from(bits / 8);
    let rest = bits % 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a network such as \"10.0.0.0/8\", \"::1/128\" or \"192.0.2.7\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cidr, E> {
                Cidr::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        for (s, n) in [
            ("0", 0),
            ("512", 512),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
            ("2 GiB", 2 << 30),
        ] {
            assert_eq!(ByteSize::parse(s), Ok(ByteSize(n)), "{s}");
        }
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("KiB").is_err());
    }

    #[test]
    fn durations_round_trip() {
        let d: Dur = serde_json::from_str("\"250ms\"").unwrap();
        assert_eq!(d.get(), Duration::from_millis(250));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"250ms\"");
        assert!(serde_json::from_str::<Dur>("\"fast\"").is_err());
    }

    #[test]
    fn durations_are_capped_at_a_day() {
        let day: Dur = serde_json::from_str("\"24h\"").unwrap();
        assert_eq!(day, Dur::MAX);
        for too_long in ["24h 1s", "2d", "30d", "1y", "18446744073709551615s", "500000000y"] {
            let e = serde_json::from_str::<Dur>(&format!("{too_long:?}")).unwrap_err();
            assert!(e.to_string().contains("invalid duration"), "{too_long}: {e}");
        }
    }

    #[test]
    fn networks_parse_and_match() {
        let lo = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(lo.contains("127.0.0.1".parse().unwrap()));
        assert!(lo.contains("127.255.0.9".parse().unwrap()));
        assert!(lo.contains("::ffff:127.0.0.2".parse().unwrap()), "IPv4-mapped");
        assert!(!lo.contains("128.0.0.1".parse().unwrap()));
        assert!(!lo.contains("::1".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.6".parse().unwrap()));
        let odd = Cidr::parse("10.0.0.0/12").unwrap();
        assert!(odd.contains("10.15.255.255".parse().unwrap()));
        assert!(!odd.contains("10.16.0.0".parse().unwrap()));
        let v6 = Cidr::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "host.example/8", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
        let c: Cidr = serde_json::from_str("\"::1/128\"").unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"::1/128\"");
    }

    proptest::proptest! {
        /// No string makes the duration parser panic, and nothing over the cap gets through.
        #[test]
        fn any_duration_string_parses_within_the_cap_or_fails(s in "[0-9]{1,25}(ns|us|ms|s|m|h|d|w|M|y)( [0-9]{1,25}(s|d|y))?") {
            if let Ok(d) = serde_json::from_str::<Dur>(&format!("{s:?}")) {
                proptest::prop_assert!(d <= Dur::MAX);
            }
        }

        /// A block contains exactly the addresses whose first `prefix` bits match its own.
        #[test]
        fn v4_blocks_match_by_prefix(net: u32, ip: u32, prefix in 0u8..=32) {
            let c = Cidr::parse(&format!("{}/{prefix}", std::net::Ipv4Addr::from(net))).unwrap();
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
            proptest::prop_assert_eq!(c.contains(std::net::Ipv4Addr::from(ip).into()), net & mask == ip & mask);
        }
    }
}
