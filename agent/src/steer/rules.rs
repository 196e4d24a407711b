//! Steering rules as the user gives them, validated and turned into the exact
//! keys the kernel maps expect. Pure: no IO, unit-tested.

use std::net::IpAddr;

use damselfly_common::{COMM_LEN, MAX_COMMS, MAX_PORTS};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[cfg(test)]
pub(crate) const DEFAULT_PORTS: [u16; 2] = [443, 80];
#[cfg(test)]
pub(crate) const DEFAULT_COMMS: [&str; 7] = [
    "containerd",
    "dockerd",
    "crio",
    "podman",
    "skopeo",
    "ctr",
    "nerdctl",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("--steer-ports: port 0 cannot be steered")]
    PortZero,
    #[error("--steer-ports: at most {MAX_PORTS} ports (got {0})")]
    TooManyPorts(usize),
    #[error("--steer-ports: give at least one port")]
    NoPorts,
    #[error("--steer-comm: {0:?} is empty or longer than 15 bytes (the kernel's comm length)")]
    BadComm(String),
    #[error("--steer-comm: at most {MAX_COMMS} names (got {0})")]
    TooManyComms(usize),
    #[error("--steer-exclude: {0:?} is not a CIDR like 10.96.0.0/12 or fd00::/108")]
    BadCidr(String),
}

/// What to steer. Serialized as-is into the agent's `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// Destination ports, in counter-slot order.
    pub ports: Vec<u16>,
    pub comms: Vec<String>,
    /// Destinations never steered, host bits cleared. Loopback is always excluded
    /// by the kernel program itself.
    pub exclude: Vec<IpNet>,
}

impl Rules {
    pub fn new(ports: &[u16], comms: &[String], exclude: &[String]) -> Result<Self, RuleError> {
        let mut p: Vec<u16> = Vec::new();
        for &port in ports {
            if port == 0 {
                return Err(RuleError::PortZero);
            }
            if !p.contains(&port) {
                p.push(port);
            }
        }
        if p.is_empty() {
            return Err(RuleError::NoPorts);
        }
        if p.len() > MAX_PORTS as usize {
            return Err(RuleError::TooManyPorts(p.len()));
        }
        let mut c: Vec<String> = Vec::new();
        for comm in comms {
            let comm = comm.trim();
            if comm.is_empty() || comm.len() >= COMM_LEN || comm.contains('\0') {
                return Err(RuleError::BadComm(comm.to_string()));
            }
            if !c.iter().any(|x| x == comm) {
                c.push(comm.to_string());
            }
        }
        if c.len() > MAX_COMMS as usize {
            return Err(RuleError::TooManyComms(c.len()));
        }
        let exclude = exclude
            .iter()
            .map(|s| parse_cidr(s.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            ports: p,
            comms: c,
            exclude,
        })
    }

    /// `COMMS` map keys: the name NUL-padded to `TASK_COMM_LEN`, as
    /// `bpf_get_current_comm` fills it.
    pub fn comm_keys(&self) -> impl Iterator<Item = [u8; COMM_LEN]> + '_ {
        self.comms.iter().map(|c| comm_key(c))
    }

    /// `EXCLUDE4` entries: (prefix length, address bytes in network order).
    pub fn exclude4(&self) -> impl Iterator<Item = (u32, [u8; 4])> + '_ {
        self.exclude.iter().filter_map(|n| match n {
            IpNet::V4(n) => Some((u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V6(_) => None,
        })
    }

    /// `EXCLUDE6` entries: (prefix length, address bytes in network order).
    pub fn exclude6(&self) -> impl Iterator<Item = (u32, [u8; 16])> + '_ {
        self.exclude.iter().filter_map(|n| match n {
            IpNet::V6(n) => Some((u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V4(_) => None,
        })
    }
}

pub(super) fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut key = [0u8; COMM_LEN];
    let n = name.len().min(COMM_LEN - 1);
    key[..n].copy_from_slice(&name.as_bytes()[..n]);
    key
}

/// A CIDR, or a bare address meaning a single host; host bits are cleared so
/// `10.1.2.3/8` excludes what the user meant, `10.0.0.0/8`.
pub(super) fn parse_cidr(s: &str) -> Result<IpNet, RuleError> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| RuleError::BadCidr(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_are_valid() {
        let r = Rules::new(&DEFAULT_PORTS, &strings(&DEFAULT_COMMS), &[]).unwrap();
        assert_eq!(r.ports, vec![443, 80]);
        assert_eq!(r.comms.len(), 7);
    }

    #[test]
    fn ports_dedup_keep_order_and_reject_zero_and_too_many() {
        let r = Rules::new(&[80, 443, 80], &[], &[]).unwrap();
        assert_eq!(r.ports, vec![80, 443]);
        assert_eq!(Rules::new(&[0], &[], &[]), Err(RuleError::PortZero));
        assert_eq!(Rules::new(&[], &[], &[]), Err(RuleError::NoPorts));
        let many: Vec<u16> = (1..=17).collect();
        assert_eq!(
            Rules::new(&many, &[], &[]),
            Err(RuleError::TooManyPorts(17))
        );
    }

    #[test]
    fn comm_keys_are_nul_padded_and_long_names_rejected() {
        let r = Rules::new(&[443], &strings(&["ctr"]), &[]).unwrap();
        let key = r.comm_keys().next().unwrap();
        assert_eq!(&key[..4], b"ctr\0");
        assert!(key[3..].iter().all(|&b| b == 0));
        let long = "a".repeat(16);
        assert_eq!(
            Rules::new(&[443], std::slice::from_ref(&long), &[]),
            Err(RuleError::BadComm(long))
        );
        // 15 bytes is the longest comm the kernel keeps.
        assert!(Rules::new(&[443], &["a".repeat(15)], &[]).is_ok());
        assert!(matches!(
            Rules::new(&[443], &strings(&[""]), &[]),
            Err(RuleError::BadComm(_))
        ));
    }

    #[test]
    fn cidrs_split_by_family_with_host_bits_cleared() {
        let r = Rules::new(
            &[443],
            &[],
            &strings(&["10.96.1.2/12", "fd00::5/108", "192.0.2.7"]),
        )
        .unwrap();
        let v4: Vec<_> = r.exclude4().collect();
        assert_eq!(v4, vec![(12, [10, 96, 0, 0]), (32, [192, 0, 2, 7])]);
        let v6: Vec<_> = r.exclude6().collect();
        assert_eq!(v6.len(), 1);
        assert_eq!(v6[0].0, 108);
        assert_eq!(v6[0].1[0], 0xfd);
        assert_eq!(v6[0].1[15], 0);
    }

    #[test]
    fn bad_cidrs_are_named_in_the_error() {
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0/8", "::/129"] {
            assert_eq!(
                Rules::new(&[443], &[], &[bad.to_string()]),
                Err(RuleError::BadCidr(bad.to_string())),
                "{bad}"
            );
        }
    }
}
