//! HTML building: escaping, the page frame, tables and form fields. No inline script
//! or style anywhere (the Content-Security-Policy forbids both): behaviour lives in
//! `assets/app.js`, looks in `assets/app.css`.

use std::fmt::Write;

use crate::Role;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The pages of the navigation, with the roles that may open them.
pub const NAV: &[(&str, &str, &[Role])] = &[
    (
        "/",
        "Dashboard",
        &[Role::Admin, Role::Operator, Role::Auditor],
    ),
    ("/models", "Models", &[Role::Admin, Role::Operator]),
    ("/keys", "Tenants & keys", &[Role::Admin]),
    ("/policy", "Policy", &[Role::Admin]),
    ("/upstreams", "Upstreams", &[Role::Admin, Role::Operator]),
    ("/audit", "Audit", &[Role::Admin, Role::Auditor]),
    ("/users", "Users", &[Role::Admin]),
    ("/system", "System", &[Role::Admin]),
];

/// Who is looking at a page (for the navigation and the logout form).
pub struct Viewer<'a> {
    pub user: &'a str,
    pub role: Role,
    pub csrf: &'a str,
    pub path: &'a str,
}

/// A message shown at the top of a page.
pub enum Flash {
    None,
    Ok(String),
    Error(String),
}

pub fn frame(title: &str, viewer: Option<&Viewer<'_>>, flash: &Flash, body: &str) -> String {
    let mut h = String::with_capacity(body.len() + 2048);
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{} · Appliance console</title>\
<link rel=\"icon\" href=\"/favicon.ico\" type=\"image/svg+xml\">\
<link rel=\"stylesheet\" href=\"/static/app.css\">\
<script src=\"/static/app.js\" defer></script></head><body>\
<a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">Sovereign AI appliance</span>",
        esc(title)
    );
    if let Some(v) = viewer {
        h.push_str("<nav aria-label=\"Main\"><ul>");
        for (path, label, roles) in NAV {
            if roles.contains(&v.role) {
                let current = if *path == v.path {
                    " aria-current=\"page\""
                } else {
                    ""
                };
                let _ = write!(h, "<li><a href=\"{path}\"{current}>{}</a></li>", esc(label));
            }
        }
        let _ = write!(
            h,
            "</ul></nav><form method=\"post\" action=\"/logout\" class=\"logout\">{}\
<span class=\"who\">{} ({})</span> <button type=\"submit\">Log out</button></form>",
            csrf_field(v.csrf),
            esc(v.user),
            v.role.as_str()
        );
    }
    let _ = write!(h, "</header><main id=\"main\"><h1>{}</h1>", esc(title));
    match flash {
        Flash::None => {}
        Flash::Ok(m) => {
            let _ = write!(h, "<p class=\"flash ok\" role=\"status\">{}</p>", esc(m));
        }
        Flash::Error(m) => {
            let _ = write!(h, "<p class=\"flash error\" role=\"alert\">{}</p>", esc(m));
        }
    }
    h.push_str(body);
    h.push_str("</main></body></html>\n");
    h
}

pub fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

/// A labelled input. `kind`: text, password, number, ...
pub fn field(name: &str, label: &str, kind: &str, value: &str, extra: &str) -> String {
    format!(
        "<p class=\"field\"><label for=\"f-{name}\">{}</label>\
<input id=\"f-{name}\" name=\"{name}\" type=\"{kind}\" value=\"{}\" {extra}></p>",
        esc(label),
        esc(value)
    )
}

/// A labelled select.
pub fn select(name: &str, label: &str, options: &[(&str, &str)], selected: &str) -> String {
    let mut h = format!(
        "<p class=\"field\"><label for=\"f-{name}\">{}</label><select id=\"f-{name}\" name=\"{name}\">",
        esc(label)
    );
    for (value, text) in options {
        let sel = if *value == selected { " selected" } else { "" };
        let _ = write!(
            h,
            "<option value=\"{}\"{sel}>{}</option>",
            esc(value),
            esc(text)
        );
    }
    h.push_str("</select></p>");
    h
}

/// A table; cells are HTML (escape text before passing it).
pub fn table(caption: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut h = format!("<table><caption>{}</caption><thead><tr>", esc(caption));
    for c in head {
        let _ = write!(h, "<th scope=\"col\">{}</th>", esc(c));
    }
    h.push_str("</tr></thead><tbody>");
    if rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\" class=\"empty\">None yet.</td></tr>",
            head.len()
        );
    }
    for r in rows {
        h.push_str("<tr>");
        for c in r {
            let _ = write!(h, "<td>{c}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str("</tbody></table>");
    h
}

/// A one-button form posting to `action` (with the CSRF token and hidden fields).
pub fn button(
    action: &str,
    label: &str,
    csrf: &str,
    hidden: &[(&str, &str)],
    confirm: bool,
) -> String {
    let mut h = format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\"{}>{}",
        esc(action),
        if confirm { " data-confirm=\"1\"" } else { "" },
        csrf_field(csrf)
    );
    for (n, v) in hidden {
        let _ = write!(
            h,
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
            esc(n),
            esc(v)
        );
    }
    let _ = write!(h, "<button type=\"submit\">{}</button></form>", esc(label));
    h
}

/// UTC time of unix seconds, `YYYY-MM-DD HH:MM`.
pub fn time(t: Option<i64>) -> String {
    let Some(t) = t else { return "–".into() };
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

/// Bytes as KiB/MiB/GiB.
pub fn bytes(n: u64) -> String {
    let f = n as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", f / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_times() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
        assert_eq!(time(Some(0)), "1970-01-01 00:00");
        assert_eq!(time(Some(1_795_347_457)), "2026-11-22 11:37");
        assert_eq!(time(Some(951_782_400)), "2000-02-29 00:00");
        assert_eq!(time(None), "–");
    }
}
