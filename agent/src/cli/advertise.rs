//! `--peer-advertise`: the address other nodes dial for our pieces. Given as
//! an IP alone (the port is then the peer listener's) or as IP:PORT, so a
//! manifest can pass `$(HOST_IP)` whatever the address family: an IPv6
//! address would need brackets before a port, which a manifest cannot add.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

/// What `--peer-advertise` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAdvertise {
    /// An IP alone: the port is the one the peer listener is bound to.
    Ip(IpAddr),
    /// IP:PORT, as other nodes must dial it (e.g. behind a NAT or a hostPort).
    Addr(SocketAddr),
}

impl PeerAdvertise {
    /// The address to tell the tracker, given the peer listener's bound port.
    pub fn resolve(self, listen_port: u16) -> SocketAddr {
        match self {
            PeerAdvertise::Ip(ip) => SocketAddr::new(ip, listen_port),
            PeerAdvertise::Addr(a) => a,
        }
    }
}

const FORMS: &str = "give an IP (10.0.0.5, fd00::5, [fd00::5]) or IP:PORT (10.0.0.5:7401, \
                     [fd00::5]:7401); an IPv6 address with a port needs brackets";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertiseError {
    #[error("empty: {FORMS}")]
    Empty,
    #[error(
        "{0:?} is not an IP address: other nodes dial what the tracker hands them as is, so use this node's IP ({FORMS})"
    )]
    NotAnIp(String),
    #[error("{0:?}: the port must be 1-65535")]
    BadPort(String),
    #[error("{0}: an unspecified address cannot be dialled by other nodes; give this node's IP")]
    Unspecified(IpAddr),
}

impl FromStr for PeerAdvertise {
    type Err = AdvertiseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(AdvertiseError::Empty);
        }
        let parsed = if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(AdvertiseError::BadPort(s.to_string()));
            }
            PeerAdvertise::Addr(a)
        } else if let Ok(ip) = s.parse::<IpAddr>() {
            PeerAdvertise::Ip(ip)
        } else if let Some(ip) = s
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|r| r.parse::<Ipv6Addr>().ok())
        {
            PeerAdvertise::Ip(ip.into())
        } else {
            return Err(port_or_host(s));
        };
        let ip = match parsed {
            PeerAdvertise::Ip(ip) => ip,
            PeerAdvertise::Addr(a) => a.ip(),
        };
        if ip.is_unspecified() {
            return Err(AdvertiseError::Unspecified(ip));
        }
        Ok(parsed)
    }
}

/// Why `s` is neither form: an IP with a port that is out of range, or no IP.
fn port_or_host(s: &str) -> AdvertiseError {
    if let Some((host, _port)) = s.rsplit_once(':') {
        let host_is_ip = host.parse::<std::net::Ipv4Addr>().is_ok()
            || host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .is_some_and(|h| h.parse::<Ipv6Addr>().is_ok());
        if host_is_ip {
            return AdvertiseError::BadPort(s.to_string());
        }
    }
    AdvertiseError::NotAnIp(s.to_string())
}

impl fmt::Display for PeerAdvertise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAdvertise::Ip(ip) => write!(f, "{ip}"),
            PeerAdvertise::Addr(a) => write!(f, "{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> SocketAddr {
        s.parse::<PeerAdvertise>()
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .resolve(7401)
    }

    #[test]
    fn a_bare_ip_takes_the_listener_port() {
        assert_eq!(ok("10.0.0.5"), "10.0.0.5:7401".parse().unwrap());
        assert_eq!(ok("fd00::5"), "[fd00::5]:7401".parse().unwrap());
        assert_eq!(ok("[fd00::5]"), "[fd00::5]:7401".parse().unwrap());
        assert_eq!(
            "2001:db8::1"
                .parse::<PeerAdvertise>()
                .unwrap()
                .resolve(9000)
                .to_string(),
            "[2001:db8::1]:9000"
        );
    }

    #[test]
    fn ip_and_port_are_kept_as_given() {
        assert_eq!(ok("10.0.0.5:30401"), "10.0.0.5:30401".parse().unwrap());
        assert_eq!(ok("[fd00::5]:30401"), "[fd00::5]:30401".parse().unwrap());
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        let err = |s: &str| s.parse::<PeerAdvertise>().unwrap_err();
        assert_eq!(err(""), AdvertiseError::Empty);
        assert_eq!(
            err("node-1:7401"),
            AdvertiseError::NotAnIp("node-1:7401".into())
        );
        assert_eq!(err("node-1"), AdvertiseError::NotAnIp("node-1".into()));
        // The expansion of an unset variable, e.g. $(HOST_IP):7401.
        assert_eq!(err(":7401"), AdvertiseError::NotAnIp(":7401".into()));
        assert_eq!(
            err("10.0.0.5:70000"),
            AdvertiseError::BadPort("10.0.0.5:70000".into())
        );
        assert_eq!(
            err("[fd00::5]:x"),
            AdvertiseError::BadPort("[fd00::5]:x".into())
        );
        assert_eq!(
            err("10.0.0.5:0"),
            AdvertiseError::BadPort("10.0.0.5:0".into())
        );
        assert!(matches!(err("0.0.0.0"), AdvertiseError::Unspecified(_)));
        assert!(matches!(err("[::]:7401"), AdvertiseError::Unspecified(_)));
        // An IPv6 address with a port and no brackets would be another address.
        assert_eq!(
            err("fd00::5:7401:1:2:3:4:5"),
            AdvertiseError::NotAnIp("fd00::5:7401:1:2:3:4:5".into())
        );
        let text = err("node-1:7401").to_string();
        assert!(text.contains("[fd00::5]:7401"), "{text}");
    }
}
