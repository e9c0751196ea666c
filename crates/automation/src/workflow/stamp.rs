//! Timestamps as the States Language writes them: RFC 3339 with an uppercase `T`, and Unix
//! milliseconds inside the interpreter.

/// Parses an RFC 3339 timestamp (ASL's: an uppercase `T`, a `Z` or an offset) to Unix ms.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    if !s.contains('T') {
        return None;
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Unix ms as RFC 3339 with milliseconds, UTC.
pub fn format_timestamp(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s, milli) = (t.hour(), t.minute(), t.second(), t.millisecond());
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}
