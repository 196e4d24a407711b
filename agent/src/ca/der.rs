//! Just enough DER to read a certificate's `notAfter` and subject: webpki does
//! not check a trust anchor's validity, and rcgen (without x509-parser) cannot
//! parse a certificate, so an expiring CA would otherwise go unnoticed, and
//! `ca uninstall` could not tell a node CA it installed from someone else's
//! file. Fed the CA's own certificate and files found on the host; anything
//! malformed is `None`.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// `id-at-organizationName` (2.5.4.10), DER contents.
pub(super) const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
/// `id-at-commonName` (2.5.4.3), DER contents.
pub(super) const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

/// `tbsCertificate.validity.notAfter` of a DER X.509 certificate.
pub(super) fn not_after(cert: &[u8]) -> Option<OffsetDateTime> {
    let (_, validity, _) = expect(tbs_field(cert, 3)?, SEQUENCE)?;
    let (_, _not_before, rest) = next(validity)?;
    let (tag, value, _) = next(rest)?;
    parse_time(tag, value)
}

/// The first value of attribute `oid` (DER contents, e.g. [`ORGANIZATION`])
/// in a DER certificate's subject, if it is text.
pub(super) fn subject_attribute(cert: &[u8], oid: &[u8]) -> Option<String> {
    // tbsCertificate.subject: a SEQUENCE of SETs of (type OID, value).
    let (_, mut rdns, _) = expect(tbs_field(cert, 4)?, SEQUENCE)?;
    while !rdns.is_empty() {
        let (_, mut set, rest) = expect(rdns, SET)?;
        rdns = rest;
        while !set.is_empty() {
            let (_, attribute, rest) = expect(set, SEQUENCE)?;
            set = rest;
            let (_, ty, value) = expect(attribute, OID)?;
            if ty == oid {
                let (_, text, _) = next(value)?;
                return std::str::from_utf8(text).ok().map(str::to_string);
            }
        }
    }
    None
}

/// `tbsCertificate` from its field number `skip` on (after the optional
/// version): 3 is `validity`, 4 is `subject`.
fn tbs_field(cert: &[u8], skip: usize) -> Option<&[u8]> {
    let (_, cert, _) = expect(cert, SEQUENCE)?;
    let (_, mut tbs, _) = expect(cert, SEQUENCE)?;
    if tbs.first() == Some(&VERSION) {
        tbs = next(tbs)?.2;
    }
    // serialNumber, signature, issuer, validity, ...
    for _ in 0..skip {
        tbs = next(tbs)?.2;
    }
    Some(tbs)
}

/// One TLV: (tag, value, rest). Low tag numbers only, definite lengths.
fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || input.len() < n {
            return None;
        }
        let (bytes, rest) = input.split_at(n);
        input = rest;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if input.len() < len {
        return None;
    }
    let (value, rest) = input.split_at(len);
    Some((tag, value, rest))
}

fn expect(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    next(input).filter(|(t, _, _)| *t == tag)
}

fn parse_time(tag: u8, value: &[u8]) -> Option<OffsetDateTime> {
    let s = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, s.len()) {
        // RFC 5280 4.1.2.5.1: two-digit years 50..99 are 19xx.
        (UTC_TIME, 12) => {
            let yy: i32 = s[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (GENERALIZED_TIME, 14) => (s[..4].parse().ok()?, &s[4..]),
        _ => return None,
    };
    let field = |i: usize| rest[i..i + 2].parse::<u8>().ok();
    let date = Date::from_calendar_date(year, Month::try_from(field(0)?).ok()?, field(2)?).ok()?;
    let time = Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};
    use time::Duration;

    use super::*;

    #[test]
    fn reads_utc_and_generalized_times() {
        let key = KeyPair::generate().unwrap();
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        for years in [1, 10, 40] {
            let mut params = CertificateParams::new(vec!["ghcr.io".into()]).unwrap();
            params.not_before = now;
            params.not_after = now + Duration::days(365 * years);
            let cert = params.clone().self_signed(&key).unwrap();
            assert_eq!(
                not_after(cert.der()),
                Some(params_not_after(&cert)),
                "{years}"
            );
        }
    }

    fn params_not_after(cert: &rcgen::Certificate) -> OffsetDateTime {
        cert.params().not_after
    }

    #[test]
    fn reads_subject_attributes() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["ghcr.io".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Damselfly");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Damselfly node CA 0a1b");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_attribute(cert.der(), ORGANIZATION).as_deref(),
            Some("Damselfly")
        );
        assert_eq!(
            subject_attribute(cert.der(), COMMON_NAME).as_deref(),
            Some("Damselfly node CA 0a1b")
        );
        // Country is not in the subject.
        assert_eq!(subject_attribute(cert.der(), &[0x55, 0x04, 0x06]), None);
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(subject_attribute(b"", ORGANIZATION), None);
        assert_eq!(
            subject_attribute(&[0x30, 0x03, 0x30, 0x01, 0x00], ORGANIZATION),
            None
        );
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None);
        assert_eq!(not_after(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
        assert_eq!(parse_time(UTC_TIME, b"991301000000Z"), None);
        assert_eq!(
            parse_time(UTC_TIME, b"491231235959Z"),
            Some(
                PrimitiveDateTime::new(
                    Date::from_calendar_date(2049, Month::December, 31).unwrap(),
                    Time::from_hms(23, 59, 59).unwrap()
                )
                .assume_utc()
            )
        );
        assert_eq!(
            parse_time(UTC_TIME, b"500101000000Z").map(|t| t.year()),
            Some(1950)
        );
    }
}
