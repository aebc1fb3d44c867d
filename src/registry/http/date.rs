//! HTTP dates (RFC 9110 §5.6.7), for `Retry-After`: the preferred IMF-fixdate
//! (`Sun, 06 Nov 1994 08:49:37 GMT`) and the two obsolete forms a recipient must accept, RFC 850
//! (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime (`Sun Nov  6 08:49:37 1994`). Hostile input
//! gives `None`, never a panic; years are bounded so nothing overflows.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of a civil date (proleptic Gregorian; H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn time_of_day(t: &str) -> Option<u64> {
    let mut it = t.split(':');
    let mut next = |max: u64| -> Option<u64> {
        let p = it.next()?;
        if p.len() != 2 {
            return None;
        }
        p.parse().ok().filter(|v| *v <= max)
    };
    let (h, m, s) = (next(23)?, next(59)?, next(60)?);
    if it.next().is_some() {
        return None;
    }
    Some(h * 3600 + m * 60 + s)
}

fn month(m: &str) -> Option<u32> {
    MONTHS.iter().position(|x| *x == m).map(|i| i as u32 + 1)
}

fn at(year: i64, mon: u32, day: u32, secs: u64) -> Option<SystemTime> {
    if !(1970..=9999).contains(&year) || !(1..=31).contains(&day) {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, mon, day)).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(
        days.checked_mul(86_400)?.checked_add(secs)?,
    ))
}

/// Parse an HTTP date; `None` if it is none of the three forms.
pub(super) fn parse_http_date(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    if !s.is_ascii() {
        return None;
    }
    let parts: Vec<&str> = s.split_whitespace().collect();
    match parts.as_slice() {
        // IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
        [_, d, m, y, t, "GMT"] if y.len() == 4 => {
            at(y.parse().ok()?, month(m)?, d.parse().ok()?, time_of_day(t)?)
        }
        // RFC 850: Sunday, 06-Nov-94 08:49:37 GMT (two-digit years: 70-99 are 19xx)
        [_, dmy, t, "GMT"] => {
            let mut it = dmy.split('-');
            let (d, m, y) = (it.next()?, it.next()?, it.next()?);
            let y: i64 = y.parse().ok()?;
            let y = if y < 70 {
                2000 + y
            } else if y < 100 {
                1900 + y
            } else {
                y
            };
            at(y, month(m)?, d.parse().ok()?, time_of_day(t)?)
        }
        // asctime: Sun Nov  6 08:49:37 1994
        [_, m, d, t, y] => at(y.parse().ok()?, month(m)?, d.parse().ok()?, time_of_day(t)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_name_the_same_instant() {
        let want = UNIX_EPOCH + Duration::from_secs(784_111_777);
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_http_date(s), Some(want), "{s}");
        }
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(UNIX_EPOCH)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 23:59:59 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(1_835_481_599))
        );
    }

    #[test]
    fn hostile_dates_are_none() {
        for s in [
            "",
            "soon",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 99 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 99999999999999999999 08:49:37 GMT",
            "Sun, 06 Nov 1900 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37:01 GMT",
            "Sön, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(s), None, "{s}");
        }
        // The far future saturates in the caller, never here.
        assert!(parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT").is_some());
    }
}
