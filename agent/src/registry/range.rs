//! `Range` requests on cached blobs: single ranges, open-ended and suffix.
//! Multi-range requests get the whole blob (RFC 9110 allows ignoring Range).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ByteRange {
    Full,
    /// `[start, end)`; answered 206 with `Content-Range`.
    Partial {
        start: u64,
        end: u64,
    },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

pub(super) fn parse(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(b) {
            Some(0) => return ByteRange::Unsatisfiable,
            Some(n) => (size.saturating_sub(n), size),
            None => return ByteRange::Full,
        },
        (false, true) => match parse(a) {
            Some(s) => (s, size),
            None => return ByteRange::Full,
        },
        (false, false) => match (parse(a), parse(b)) {
            (Some(s), Some(e)) if s <= e => (s, e.saturating_add(1).min(size)),
            _ => return ByteRange::Full,
        },
        (true, true) => return ByteRange::Full,
    };
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    if start == 0 && end == size {
        return ByteRange::Full;
    }
    ByteRange::Partial { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_open_suffix_and_bad_ranges() {
        assert_eq!(parse(None, 100), ByteRange::Full);
        assert_eq!(
            parse(Some("bytes=10-19"), 100),
            ByteRange::Partial { start: 10, end: 20 }
        );
        assert_eq!(
            parse(Some("bytes=10-"), 100),
            ByteRange::Partial {
                start: 10,
                end: 100
            }
        );
        assert_eq!(
            parse(Some("bytes=-10"), 100),
            ByteRange::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(
            parse(Some("bytes=90-500"), 100),
            ByteRange::Partial {
                start: 90,
                end: 100
            }
        );
        assert_eq!(parse(Some("bytes=0-"), 100), ByteRange::Full);
        assert_eq!(parse(Some("bytes=100-"), 100), ByteRange::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 100), ByteRange::Unsatisfiable);
        assert_eq!(parse(Some("bytes=5-1"), 100), ByteRange::Full);
        assert_eq!(parse(Some("bytes=0-1,5-6"), 100), ByteRange::Full);
        assert_eq!(parse(Some("items=0-1"), 100), ByteRange::Full);
        assert_eq!(parse(Some("bytes=x-"), 100), ByteRange::Full);
    }
}
