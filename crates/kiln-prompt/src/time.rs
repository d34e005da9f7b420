//! A small UTC date-time with Python-style `strftime`, for chat templates' `strftime_now`.
//! (Written here rather than pulling chrono/jiff: a dozen format codes over a civil date.)

/// A UTC date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

impl DateTime {
    pub(crate) fn new(
        year: i64,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Self {
        DateTime {
            year,
            month: month.clamp(1, 12),
            day: day.clamp(1, 31),
            hour: hour.min(23),
            minute: minute.min(59),
            second: second.min(59),
        }
    }

    /// The current time, UTC.
    pub(crate) fn now() -> Self {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Self::from_unix(secs)
    }

    pub(crate) fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        DateTime::new(
            y,
            m,
            d,
            (rem / 3600) as u32,
            (rem % 3600 / 60) as u32,
            (rem % 60) as u32,
        )
    }

    fn days(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day)
    }

    fn weekday(&self) -> usize {
        (self.days() + 4).rem_euclid(7) as usize // 1970-01-01 was a Thursday.
    }

    fn day_of_year(&self) -> i64 {
        self.days() - days_from_civil(self.year, 1, 1) + 1
    }

    /// Formats like Python's `datetime.strftime` for the common codes
    /// (`%d %-d %e %b %B %m %-m %y %Y %H %M %S %I %p %a %A %j %F %%`).
    pub(crate) fn strftime(&self, fmt: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut chars = fmt.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let mut code = chars
                .next()
                .ok_or("strftime: format ends with a lone '%'")?;
            let no_pad = code == '-';
            if no_pad {
                code = chars.next().ok_or("strftime: format ends with '%-'")?;
            }
            let num = |v: i64, w: usize| {
                if no_pad {
                    v.to_string()
                } else {
                    format!("{v:0w$}")
                }
            };
            let mon = MONTHS[(self.month - 1) as usize];
            let wd = WEEKDAYS[self.weekday()];
            match code {
                'd' => out.push_str(&num(self.day.into(), 2)),
                'e' => out.push_str(&format!("{:>2}", self.day)),
                'm' => out.push_str(&num(self.month.into(), 2)),
                'y' => out.push_str(&num(self.year.rem_euclid(100), 2)),
                'Y' => out.push_str(&self.year.to_string()),
                'H' => out.push_str(&num(self.hour.into(), 2)),
                'I' => out.push_str(&num((((self.hour + 11) % 12) + 1).into(), 2)),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'M' => out.push_str(&num(self.minute.into(), 2)),
                'S' => out.push_str(&num(self.second.into(), 2)),
                'b' | 'h' => out.push_str(&mon[..3]),
                'B' => out.push_str(mon),
                'a' => out.push_str(&wd[..3]),
                'A' => out.push_str(wd),
                'j' => out.push_str(&num(self.day_of_year(), 3)),
                'F' => out.push_str(&format!("{}-{:02}-{:02}", self.year, self.month, self.day)),
                '%' => out.push('%'),
                other => return Err(format!("strftime: unsupported format code %{other}")),
            }
        }
        Ok(out)
    }
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        // python3 -c "import datetime; d=datetime.datetime(2024,7,26,9,5,3); print(d.strftime('%d %b %Y|%A %B %-d %j %I%p %F'))"
        // 26 Jul 2024|Friday July 26 208 09AM 2024-07-26
        let d = DateTime::new(2024, 7, 26, 9, 5, 3);
        assert_eq!(
            d.strftime("%d %b %Y|%A %B %-d %j %I%p %F").as_deref(),
            Ok("26 Jul 2024|Friday July 26 208 09AM 2024-07-26")
        );
        assert!(d.strftime("%Q").is_err());
    }

    #[test]
    fn unix_round_trip() {
        // 2024-02-29T12:34:56Z = 1709210096
        assert_eq!(
            DateTime::from_unix(1_709_210_096),
            DateTime::new(2024, 2, 29, 12, 34, 56)
        );
        assert_eq!(DateTime::from_unix(0), DateTime::new(1970, 1, 1, 0, 0, 0));
    }
}
