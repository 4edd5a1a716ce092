//! Clean-up of an answer string before it is parsed: delimiters, spacing, units, degrees, percent.

/// Answers longer than this (in bytes) are compared as strings only.
pub(crate) const MAX_ANSWER_BYTES: usize = 1000;

/// An answer after clean-up.
#[derive(Debug, Clone)]
pub(crate) struct Cleaned {
    /// The cleaned LaTeX text.
    pub text: String,
    /// Whether a percent sign was removed.
    pub percent: bool,
}

const TEXT_WRAPPERS: &[&str] = &[
    "\\text",
    "\\textrm",
    "\\textnormal",
    "\\textup",
    "\\textit",
    "\\textbf",
    "\\mbox",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\boldsymbol",
    "\\bm",
    "\\mathsf",
    "\\mathtt",
    "\\rm",
    "\\hbox",
];

/// Clean `s` (an extracted answer or a gold answer).
pub(crate) fn clean(s: &str) -> Cleaned {
    let s = s.trim();
    if s.len() > MAX_ANSWER_BYTES {
        return Cleaned {
            text: s.to_string(),
            percent: false,
        };
    }
    let mut t = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\r' | '\t' | '\u{a0}' | '\u{2009}' | '\u{202f}' => t.push(' '),
            '−' | '–' | '—' => t.push('-'),
            '×' => t.push_str("\\times "),
            '·' | '⋅' => t.push_str("\\cdot "),
            '÷' => t.push_str("\\div "),
            'π' => t.push_str("\\pi "),
            '√' => t.push_str("\\sqrt"),
            '∞' => t.push_str("\\infty "),
            '°' => t.push_str("^\\circ "),
            '≤' => t.push_str("\\le "),
            '≥' => t.push_str("\\ge "),
            '≠' => t.push_str("\\ne "),
            '∪' => t.push_str("\\cup "),
            '∈' => t.push_str("\\in "),
            '±' => t.push_str("\\pm "),
            '，' => t.push(','),
            '∅' => t.push_str("\\emptyset "),
            _ => t.push(c),
        }
    }
    // protect the row separator `\\` from the single-backslash rules below
    t = t.replace("\\\\", "\u{1}");
    let thin = t.contains("\\!") || t.contains("{,}");
    for d in ["^{\\circ}", "^\\circ", "^{ \\circ }", "^{\\circ }"] {
        if t.contains(d) {
            t = t.replace(d, " ");
        }
    }
    const DROP: &[&str] = &[
        "\\left",
        "\\right",
        "\\bigl",
        "\\bigr",
        "\\Bigl",
        "\\Bigr",
        "\\biggl",
        "\\biggr",
        "\\big",
        "\\Big",
        "\\bigg",
        "\\displaystyle",
        "\\textstyle",
        "\\!",
        "\\limits",
        "\\circ",
        "\\degree",
        "\\$",
        "$",
        "\\(",
        "\\)",
        "\\[",
        "\\]",
        "\\nonumber",
    ];
    for d in DROP {
        t = replace_cmd(&t, d, "");
    }
    const SPACE: &[&str] = &[
        "\\,",
        "\\;",
        "\\:",
        "\\ ",
        "\\quad",
        "\\qquad",
        "~",
        "\\enspace",
    ];
    for d in SPACE {
        t = replace_cmd(&t, d, " ");
    }
    const MAP: &[(&str, &str)] = &[
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
        ("\\dbinom", "\\binom"),
        ("\\tbinom", "\\binom"),
        ("\\leqslant", "\\le"),
        ("\\geqslant", "\\ge"),
        ("\\leq", "\\le"),
        ("\\geq", "\\ge"),
        ("\\neq", "\\ne"),
        ("\\lvert", "|"),
        ("\\rvert", "|"),
        ("\\vert", "|"),
        ("\\lbrack", "["),
        ("\\rbrack", "]"),
        ("\\varnothing", "\\emptyset"),
        ("{,}", ","),
        ("\\%", "%"),
    ];
    for (a, b) in MAP {
        t = replace_cmd(&t, a, b);
    }
    // Degree marks left as an empty power.
    for d in ["^{}", "^ {}"] {
        if t.contains(d) {
            t = t.replace(d, "");
        }
    }
    t = t.replace('\u{1}', "\\\\");
    let mut percent = false;
    if t.contains('%') {
        percent = true;
        t = t.replace('%', "");
    }
    let mut t = trim_ends(&t).to_string();
    for _ in 0..3 {
        let before = t.len();
        t = strip_trailing_unit(&t);
        t = trim_ends(&t).to_string();
        if t.len() == before {
            break;
        }
    }
    t = unwrap_text(&t);
    t = trim_ends(&t).to_string();
    t = thousands(&t, thin);
    Cleaned { text: t, percent }
}

fn trim_ends(s: &str) -> &str {
    let mut t = s.trim();
    loop {
        let before = t.len();
        t = t.trim_end_matches(['.', ',', ';']).trim();
        t = t.trim_start_matches(':').trim();
        if t.len() == before {
            return t;
        }
    }
}

/// Replace the command `pat` where it is not the prefix of a longer command name.
pub(crate) fn replace_cmd(s: &str, pat: &str, with: &str) -> String {
    if !s.contains(pat) {
        return s.to_string();
    }
    let letters = pat.starts_with('\\') && pat[1..].bytes().all(|b| b.is_ascii_alphabetic());
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(pat) {
        let after = &rest[i + pat.len()..];
        out.push_str(&rest[..i]);
        if letters
            && after
                .as_bytes()
                .first()
                .is_some_and(|b| b.is_ascii_alphabetic())
        {
            out.push_str(pat);
        } else {
            out.push_str(with);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Index of the `}` matching the `{` at `open`.
pub(crate) fn match_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn has_digit(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_digit())
}

fn ends_with_operator(s: &str) -> bool {
    let t = s.trim_end();
    t.ends_with(['+', '-', '*', '/', '^', '_', '=', '(', '[', '{', ','])
        || t.ends_with("\\cdot")
        || t.ends_with("\\times")
        || t.ends_with("\\in")
}

/// Remove one trailing unit: `\text{ cm}^2`, `\mbox{ inches}`, `\mathrm{~m}` or plain words
/// (`5 dollars`), when a number stays before it.
fn strip_trailing_unit(s: &str) -> String {
    // Optional power after the unit: ^2, ^{2}, ^3.
    let mut end = s.len();
    let body = s.trim_end();
    if let Some(p) = body.rfind('^') {
        let pw = body[p + 1..].trim();
        let pw = pw.trim_start_matches('{').trim_end_matches('}').trim();
        if !pw.is_empty() && pw.len() <= 3 && pw.bytes().all(|c| c.is_ascii_digit() || c == b'-') {
            end = p;
        }
    }
    let core = s[..end].trim_end();
    if core.ends_with('}') {
        let cb = core.as_bytes();
        // find the `{` matching the final `}`
        let mut depth = 0i32;
        let mut open = None;
        for i in (0..cb.len()).rev() {
            match cb[i] {
                b'}' if i == 0 || cb[i - 1] != b'\\' => depth += 1,
                b'{' if i == 0 || cb[i - 1] != b'\\' => {
                    depth -= 1;
                    if depth == 0 {
                        open = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        if let Some(o) = open {
            let before = core[..o].trim_end();
            if let Some(w) = TEXT_WRAPPERS.iter().find(|w| before.ends_with(**w)) {
                let content = &core[o + 1..core.len() - 1];
                let rest = before[..before.len() - w.len()].trim_end();
                let unitlike = content
                    .bytes()
                    .all(|c| c.is_ascii_alphabetic() || b" /.^~-{}\\23".contains(&c));
                let words: String = content
                    .chars()
                    .filter(|c| c.is_ascii_alphabetic())
                    .collect();
                if unitlike
                    && !words.is_empty()
                    && !is_connective(&words)
                    && has_digit(rest)
                    && !ends_with_operator(rest)
                {
                    return rest.to_string();
                }
            }
        }
    }
    // Plain trailing words after whitespace: "5 cm", "10 square units", "30 km/h".
    let core = s[..end].trim_end();
    let mut cut = core.len();
    let mut words = 0;
    loop {
        let head = core[..cut].trim_end();
        let Some(sp) = head.rfind(' ') else { break };
        let w = &head[sp + 1..];
        let letters = w.bytes().filter(|c| c.is_ascii_alphabetic()).count();
        let ok = letters >= 2
            && w.bytes()
                .all(|c| c.is_ascii_alphabetic() || c == b'/' || c == b'.')
            && !is_connective(w);
        if !ok {
            break;
        }
        cut = sp;
        words += 1;
        if words >= 3 {
            break;
        }
    }
    if words > 0 {
        let rest = core[..cut].trim_end();
        if has_digit(rest) && !ends_with_operator(rest) && !rest.contains("\\text") {
            return rest.to_string();
        }
    }
    s.to_string()
}

fn is_connective(w: &str) -> bool {
    matches!(
        w.to_ascii_lowercase().as_str(),
        "or" | "and" | "to" | "in" | "is" | "then"
    )
}

/// Replace text wrappers `\text{X}` by `X`.
fn unwrap_text(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let mut out = s.to_string();
    for _ in 0..16 {
        let b = out.as_bytes();
        let mut found = None;
        for w in TEXT_WRAPPERS {
            let mut from = 0;
            while let Some(p) = out[from..].find(w) {
                let p = from + p;
                let after = p + w.len();
                let mut q = after;
                while q < b.len() && b[q] == b' ' {
                    q += 1;
                }
                if q < b.len() && b[q] == b'{' {
                    if let Some(c) = match_brace(b, q) {
                        found = Some((p, q, c));
                        break;
                    }
                }
                from = after;
            }
            if found.is_some() {
                break;
            }
        }
        let Some((p, q, c)) = found else { break };
        let inner = out[q + 1..c].to_string();
        out = format!("{}{}{}", &out[..p], inner, &out[c + 1..]);
    }
    out
}

/// `10,080` and `11, 111` (the latter only when written with `\!`) become plain numbers.
fn thousands(s: &str, thin: bool) -> String {
    let t: String = if thin {
        s.chars().filter(|c| *c != ' ').collect()
    } else {
        s.to_string()
    };
    let b = t.as_bytes();
    let mut i = 0;
    if i < b.len() && b[i] == b'-' {
        i += 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let lead = i - start;
    if lead == 0 || lead > 3 {
        return s.to_string();
    }
    let mut groups = 0;
    while i < b.len() && b[i] == b',' {
        let g = i + 1;
        let mut j = g;
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        if j - g != 3 {
            return s.to_string();
        }
        groups += 1;
        i = j;
    }
    if groups == 0 {
        return s.to_string();
    }
    if i < b.len() && (b[i] != b'.' || !b[i + 1..].iter().all(|c| c.is_ascii_digit())) {
        return s.to_string();
    }
    t.replace(',', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans() {
        let c = |s: &str| clean(s).text;
        assert_eq!(c("\\$32,\\!348"), "32348");
        assert_eq!(c("11,\\! 111,\\! 111,\\! 100"), "11111111100");
        assert_eq!(c("3, 5, 7"), "3, 5, 7");
        assert_eq!(c("15\\mbox{ cm}^2"), "15");
        assert_eq!(c("5.4 \\text{ cents}"), "5.4");
        assert_eq!(c("\\frac{270}7\\text{ degrees}"), "\\frac{270}7");
        assert_eq!(c("30^\\circ"), "30");
        assert_eq!(c("\\text{east}"), "east");
        assert_eq!(c("\\text{(B)}"), "(B)");
        assert_eq!(c("6.5 \\mathrm{~m}"), "6.5");
        assert_eq!(c("12 square units"), "12");
        assert_eq!(c("\\leftarrow"), "\\leftarrow");
        assert!(clean("50\\%").percent);
        assert_eq!(
            c("\\left( 3, \\frac{\\pi}{2} \\right)"),
            "( 3, \\frac{\\pi}{2} )"
        );
    }
}
