//! How ferry shows things to people the way kubectl does: ages and tables. Pure.

use std::time::Duration;

/// An age the way kubectl prints it (k8s.io/apimachinery `duration.HumanDuration`): about
/// two significant figures, `59s`, `119s`, `2m`, `5m3s`, `54m`, `179m`, `3h`, `5h3m`, `47h`,
/// `3d5h`, `11d`, `2y7d`, `8y`. A unit whose remainder is zero is left out (`5m`, not `5m0s`).
pub fn human_age(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        return with_rest(minutes, "m", secs % 60, "s");
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        return with_rest(hours, "h", minutes % 60, "m");
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        return with_rest(days, "d", hours % 24, "h");
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        return with_rest(years, "y", days % 365, "d");
    }
    format!("{years}y")
}

fn with_rest(n: u64, unit: &str, rest: u64, rest_unit: &str) -> String {
    if rest == 0 {
        format!("{n}{unit}")
    } else {
        format!("{n}{unit}{rest}{rest_unit}")
    }
}

/// Left-aligned columns, three spaces apart, like kubectl; trailing spaces trimmed.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(secs: u64) -> String {
        human_age(Duration::from_secs(secs))
    }

    /// The cases of apimachinery's `TestHumanDuration`, plus the boundaries.
    #[test]
    fn ages_read_like_kubectl() {
        const M: u64 = 60;
        const H: u64 = 3600;
        const D: u64 = 24 * H;
        const Y: u64 = 365 * D;
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (1, "1s"),
            (9, "9s"),
            (59, "59s"),
            (60, "60s"),
            (119, "119s"),
            (2 * M, "2m"),
            (147, "2m27s"),
            (5 * M + 3, "5m3s"),
            (9 * M + 59, "9m59s"),
            (10 * M, "10m"),
            (10 * M + 59, "10m"),
            (54 * M, "54m"),
            (3 * H - 1, "179m"),
            (3 * H, "3h"),
            (5 * H + 3 * M, "5h3m"),
            (7 * H + 59 * M + 59, "7h59m"),
            (8 * H, "8h"),
            (47 * H + 59 * M, "47h"),
            (48 * H, "2d"),
            (3 * D + 5 * H, "3d5h"),
            (7 * D + 23 * H, "7d23h"),
            (8 * D, "8d"),
            (11 * D, "11d"),
            (729 * D + 23 * H, "729d"),
            (2 * Y, "2y"),
            (2 * Y + 7 * D, "2y7d"),
            (8 * Y - 1, "7y364d"),
            (8 * Y, "8y"),
            (100 * Y, "100y"),
        ];
        for (secs, want) in cases {
            assert_eq!(age(*secs), *want, "{secs} s");
        }
        // Below a second counts as 0; milliseconds do not round up.
        assert_eq!(human_age(Duration::from_millis(1999)), "1s");
    }

    #[test]
    fn tables_pad_columns() {
        let t = table(&[
            vec!["NAME".into(), "TYPE".into()],
            vec!["nextcloud-dev-nodeport".into(), "NodePort".into()],
        ]);
        assert_eq!(
            t,
            "NAME                     TYPE\nnextcloud-dev-nodeport   NodePort\n"
        );
        let t = table(&[
            vec!["NAME".into(), "AGE".into(), "".into()],
            vec!["a".into(), "1s".into()],
        ]);
        assert_eq!(t, "NAME   AGE\na      1s\n");
    }
}
