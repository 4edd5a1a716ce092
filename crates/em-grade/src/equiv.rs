//! Answer structure (tuples, sets, intervals, matrices, equations, text) and equivalence.

use crate::expr::{self, Expr, C};
use crate::normalize::{clean, Cleaned, MAX_ANSWER_BYTES};
use std::collections::BTreeSet;

/// Step budget for one comparison (bounds the time per item).
const STEP_BUDGET: u64 = 400_000;
/// Most items in a list, set or matrix that are compared.
const MAX_ITEMS: usize = 128;
/// Random points at which expressions with free variables are compared.
const POINTS: usize = 6;

/// A parsed answer.
#[derive(Debug, Clone)]
pub(crate) enum Ans {
    Expr(Expr),
    /// Plain text, normalised (lowercase, alphanumerics only).
    Text(String),
    /// A multiple-choice letter A–E.
    Choice(u8),
    /// Ordered: a point, tuple or interval, with its brackets.
    Tuple(u8, u8, Vec<Ans>),
    /// Unordered: `\{…\}` (braced) or a bare comma list.
    Set(bool, Vec<Ans>),
    Union(Vec<Ans>),
    Matrix(Vec<Vec<Ans>>),
    Eq(Box<Ans>, Box<Ans>),
    /// Relation other than `=`: op, lhs, rhs.
    Rel(&'static str, Box<Ans>, Box<Ans>),
}

fn text_key(s: &str) -> String {
    let mut out = String::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        if b[i] == b'\\' {
            // drop command names such as \text
            i += 1;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            continue;
        }
        let c = s[i..].chars().next().unwrap_or(' ');
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        }
        i += c.len_utf8();
    }
    out
}

/// Split `s` at top level on commas (and on the words "or"/"and").
fn split_top(s: &str) -> Vec<&str> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if b.get(i + 1).is_some_and(|c| matches!(c, b'{' | b'}')) => {
                depth += if b[i + 1] == b'{' { 1 } else { -1 };
                i += 1;
            }
            b'\\' if b[i..].starts_with(b"\\begin") => depth += 1,
            b'\\' if b[i..].starts_with(b"\\end") => depth -= 1,
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            b' ' if depth == 0 => {
                for w in [" or ", " and ", " text{or} "] {
                    if b[i..].starts_with(w.as_bytes()) {
                        parts.push(&s[start..i]);
                        start = i + w.len();
                        i = start - 1;
                        break;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Split on a top-level command such as `\cup`.
fn split_cmd<'a>(s: &'a str, cmd: &str) -> Vec<&'a str> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            b'\\'
                if depth == 0
                    && b[i..].starts_with(cmd.as_bytes())
                    && !b
                        .get(i + cmd.len())
                        .is_some_and(|c| c.is_ascii_alphabetic()) =>
            {
                parts.push(&s[start..i]);
                start = i + cmd.len();
                i = start;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts.into_iter().map(str::trim).collect()
}

/// Position of the closing bracket matching the opener at 0, counting all bracket kinds alike.
fn outer_close(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 0i32;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn top_level_find(s: &str, pat: &str) -> Vec<usize> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0i32;
    for i in 0..b.len() {
        match b[i] {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ if depth == 0 && b[i..].starts_with(pat.as_bytes()) => out.push(i),
            _ => {}
        }
    }
    out
}

fn has_word(s: &str) -> bool {
    // A run of three or more letters that is not a command or a known function.
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 1;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            continue;
        }
        if b[i].is_ascii_alphabetic() {
            let st = i;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            let w = &s[st..i];
            if w.len() >= 3 && !expr::is_func_name(w) && !(st > 0 && b[st - 1] == b'_') {
                return true;
            }
            continue;
        }
        if b[i] >= 0x80 {
            return true;
        }
        i += 1;
    }
    false
}

/// Parse a cleaned answer into its structure.
pub(crate) fn parse_answer(s: &str, depth: usize) -> Ans {
    let s = s.trim();
    if depth > 6 || s.len() > MAX_ANSWER_BYTES || s.is_empty() {
        return Ans::Text(text_key(s));
    }
    // "x \in S" and "S" alike
    if let Some(p) = s
        .find("\\in ")
        .or_else(|| s.find("\\in["))
        .or_else(|| s.find("\\in("))
    {
        let lhs = s[..p].trim();
        if lhs.len() <= 3 && lhs.bytes().all(|c| c.is_ascii_alphabetic()) {
            return parse_answer(&s[p + 3..], depth + 1);
        }
    }
    match s {
        "\\mathbb{R}" | "\\mathbb R" => {
            return Ans::Tuple(
                b'(',
                b')',
                vec![
                    Ans::Expr(Expr::Neg(Box::new(Expr::Inf))),
                    Ans::Expr(Expr::Inf),
                ],
            )
        }
        "\\emptyset" | "\\{\\}" | "{}" => return Ans::Set(true, vec![]),
        _ => {}
    }
    if let Some(m) = parse_matrix(s, depth) {
        return m;
    }
    let cups = split_cmd(s, "\\cup");
    if cups.len() > 1 {
        return Ans::Union(
            cups.iter()
                .take(MAX_ITEMS)
                .map(|p| parse_answer(p, depth + 1))
                .collect(),
        );
    }
    let items = split_top(s);
    if items.len() > 1 {
        let mut v = Vec::new();
        for it in items.iter().take(MAX_ITEMS) {
            push_item(&mut v, parse_answer(it, depth + 1));
        }
        return Ans::Set(false, v);
    }
    // enclosed: \{…\}, (…), […], (…], […)
    if let Some(inner) = s.strip_prefix("\\{").and_then(|x| x.strip_suffix("\\}")) {
        let mut v = Vec::new();
        for it in split_top(inner).iter().take(MAX_ITEMS) {
            push_item(&mut v, parse_answer(it, depth + 1));
        }
        return Ans::Set(true, v);
    }
    let b = s.as_bytes();
    if matches!(b[0], b'(' | b'[' | b'{') && outer_close(s) == Some(s.len() - 1) {
        let inner = &s[1..s.len() - 1];
        let parts = split_top(inner);
        if parts.len() > 1 || inner.trim_end().ends_with(',') {
            let v: Vec<Ans> = parts
                .iter()
                .take(MAX_ITEMS)
                .map(|p| parse_answer(p, depth + 1))
                .collect();
            return if b[0] == b'{' {
                Ans::Set(true, v)
            } else {
                Ans::Tuple(b[0], b[s.len() - 1], v)
            };
        }
        if b[0] == b'(' && inner.len() == 1 && (b'A'..=b'E').contains(&inner.as_bytes()[0]) {
            return Ans::Choice(inner.as_bytes()[0]);
        }
    }
    // equations and relations
    let eqs = top_level_find(s, "=");
    if !eqs.is_empty() {
        let first = eqs[0];
        let last = *eqs.last().unwrap_or(&first);
        let lhs = parse_answer(&s[..first], depth + 1);
        let rhs = parse_answer(&s[last + 1..], depth + 1);
        return Ans::Eq(Box::new(lhs), Box::new(rhs));
    }
    for (pat, op) in [
        ("\\le", "le"),
        ("\\ge", "ge"),
        ("\\ne", "ne"),
        ("<", "lt"),
        (">", "gt"),
    ] {
        let at = top_level_find(s, pat);
        if at.len() == 1 {
            let p = at[0];
            let lhs = parse_answer(&s[..p], depth + 1);
            let rhs = parse_answer(&s[p + pat.len()..], depth + 1);
            return Ans::Rel(op, Box::new(lhs), Box::new(rhs));
        }
    }
    if s.len() == 1 && (b'A'..=b'E').contains(&b[0]) {
        return Ans::Choice(b[0]);
    }
    if has_word(s) {
        return Ans::Text(text_key(s));
    }
    if s.contains("\\pm") || s.contains("\\mp") {
        if let (Some(a), Some(b)) = (expr::parse(s, 1.0), expr::parse(s, -1.0)) {
            return Ans::Set(false, vec![Ans::Expr(a), Ans::Expr(b)]);
        }
    }
    match expr::parse(s, 1.0) {
        Some(e) => Ans::Expr(e),
        None => Ans::Text(text_key(s)),
    }
}

/// Push an item into a list, flattening a `\pm` pair.
fn push_item(v: &mut Vec<Ans>, a: Ans) {
    match a {
        Ans::Set(false, xs) if xs.len() == 2 && xs.iter().all(|x| matches!(x, Ans::Expr(_))) => {
            v.extend(xs)
        }
        a => v.push(a),
    }
}

fn parse_matrix(s: &str, depth: usize) -> Option<Ans> {
    let rest = s.strip_prefix("\\begin{")?;
    let close = rest.find('}')?;
    let env = &rest[..close];
    if !env.ends_with("matrix") && env != "array" {
        return None;
    }
    let mut body = &rest[close + 1..];
    if env == "array" {
        // column spec
        let spec = body.trim_start().strip_prefix('{')?;
        body = &spec[spec.find('}')? + 1..];
    }
    let end = format!("\\end{{{env}}}");
    let body = body.trim_end().strip_suffix(end.as_str())?;
    let mut rows = Vec::new();
    for row in body
        .split("\\\\")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .take(MAX_ITEMS)
    {
        rows.push(
            row.split('&')
                .take(MAX_ITEMS)
                .map(|c| parse_answer(c, depth + 1))
                .collect(),
        );
    }
    Some(Ans::Matrix(rows))
}

/// State of one comparison.
struct Cmp {
    steps: u64,
}

fn close(a: C, b: C, rel: f64) -> bool {
    if a == b {
        return true;
    }
    if !a.is_finite() || !b.is_finite() {
        return false;
    }
    let d = C {
        re: a.re - b.re,
        im: a.im - b.im,
    }
    .abs();
    let scale = a.abs().max(b.abs());
    d <= rel * scale || (rel < 1e-6 && d <= 1e-11)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Cmp {
    fn expr_eq(&mut self, p: &Expr, g: &Expr, scale_p: f64, scale_g: f64) -> bool {
        // loose only when the gold is a decimal (an approximation)
        let rel = if expr::has_decimal(g) { 1e-4 } else { 1e-9 };
        let mut names = BTreeSet::new();
        expr::vars(p, &mut names);
        expr::vars(g, &mut names);
        let names: Vec<String> = names.into_iter().take(16).collect();
        let scale = |v: C, s: f64| {
            if s == 1.0 {
                v
            } else {
                C {
                    re: v.re * s,
                    im: v.im * s,
                }
            }
        };
        if names.is_empty() {
            let mut env = expr::Env {
                names: &[],
                values: &[],
                steps: &mut self.steps,
            };
            let a = scale(expr::eval(p, &mut env), scale_p);
            let b = scale(expr::eval(g, &mut env), scale_g);
            return close(a, b, rel);
        }
        let ints = expr::is_integer_flavoured(p) || expr::is_integer_flavoured(g);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut valid = 0;
        let mut values = vec![C::real(0.0); names.len()];
        for k in 0..POINTS {
            for v in values.iter_mut() {
                let u = rng.next();
                *v = if ints {
                    C::real(2.0 + (u * 10.0).floor())
                } else {
                    let x = 0.35 + 2.1 * u;
                    // the later points also probe negative values
                    C::real(if k >= POINTS / 2 && rng.next() < 0.5 {
                        -x
                    } else {
                        x
                    })
                };
            }
            let mut env = expr::Env {
                names: &names,
                values: &values,
                steps: &mut self.steps,
            };
            let a = scale(expr::eval(p, &mut env), scale_p);
            let b = scale(expr::eval(g, &mut env), scale_g);
            if self.steps == 0 {
                return false;
            }
            if !a.is_finite() || !b.is_finite() {
                continue;
            }
            if !close(a, b, rel) {
                return false;
            }
            valid += 1;
        }
        valid >= 2
    }

    /// lhs - rhs of each equation proportional with a nonzero factor (same solution set).
    fn equation_eq(&mut self, pl: &Expr, pr: &Expr, gl: &Expr, gr: &Expr) -> bool {
        let p = Expr::Sub(Box::new(pl.clone()), Box::new(pr.clone()));
        let g = Expr::Sub(Box::new(gl.clone()), Box::new(gr.clone()));
        let mut names = BTreeSet::new();
        expr::vars(&p, &mut names);
        expr::vars(&g, &mut names);
        let names: Vec<String> = names.into_iter().take(16).collect();
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let mut ratio: Option<C> = None;
        let mut valid = 0;
        let mut values = vec![C::real(0.0); names.len()];
        for _ in 0..POINTS {
            for v in values.iter_mut() {
                *v = C::real(0.35 + 2.1 * rng.next());
            }
            let mut env = expr::Env {
                names: &names,
                values: &values,
                steps: &mut self.steps,
            };
            let a = expr::eval(&p, &mut env);
            let b = expr::eval(&g, &mut env);
            if !a.is_finite() || !b.is_finite() || b.abs() < 1e-9 {
                if a.is_finite() && b.is_finite() && (a.abs() < 1e-9) != (b.abs() < 1e-9) {
                    return false;
                }
                continue;
            }
            let r = C { re: a.re, im: a.im };
            let d = b.re * b.re + b.im * b.im;
            let q = C {
                re: (r.re * b.re + r.im * b.im) / d,
                im: (r.im * b.re - r.re * b.im) / d,
            };
            if q.abs() < 1e-12 {
                return false;
            }
            match ratio {
                None => ratio = Some(q),
                Some(r0) => {
                    if !close(q, r0, 1e-7) {
                        return false;
                    }
                }
            }
            valid += 1;
        }
        valid >= 2
    }

    fn eq(&mut self, p: &Ans, g: &Ans) -> bool {
        if self.steps == 0 {
            return false;
        }
        self.steps -= 1;
        use Ans::*;
        match (p, g) {
            (Expr(a), Expr(b)) => self.expr_eq(a, b, 1.0, 1.0),
            (Text(a), Text(b)) => a == b,
            (Choice(a), Choice(b)) => a == b,
            (Choice(c), Expr(crate::expr::Expr::Var(v)))
            | (Expr(crate::expr::Expr::Var(v)), Choice(c)) => v.len() == 1 && v.as_bytes()[0] == *c,
            (Choice(c), Text(t)) | (Text(t), Choice(c)) => {
                t.len() == 1 && t.as_bytes()[0] == c.to_ascii_lowercase()
            }
            (Tuple(po, pc, a), Tuple(go, gc, b)) => po == go && pc == gc && self.ordered(a, b),
            (Set(_, a), Set(_, b)) => self.unordered(a, b),
            // a bare list given as a tuple, in the same order
            (Tuple(b'(', b')', a), Set(false, b)) | (Set(false, a), Tuple(b'(', b')', b)) => {
                self.ordered(a, b)
            }
            (Set(_, a), x) if a.len() == 1 => self.eq(&a[0], x),
            (x, Set(_, b)) if b.len() == 1 => self.eq(x, &b[0]),
            (Union(a), Union(b)) => self.unordered(a, b),
            (Matrix(a), Matrix(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(ra, rb)| ra.len() == rb.len() && self.ordered(ra, rb))
            }
            (Matrix(m), Tuple(b'(', b')', t)) | (Tuple(b'(', b')', t), Matrix(m)) => {
                let flat: Vec<Ans> = if m.iter().all(|r| r.len() == 1) {
                    m.iter().map(|r| r[0].clone()).collect()
                } else if m.len() == 1 {
                    m[0].clone()
                } else {
                    return false;
                };
                self.ordered(&flat, t)
            }
            (Eq(pl, pr), Eq(gl, gr)) => {
                if let (Expr(a), Expr(b), Expr(c), Expr(d)) = (&**pl, &**pr, &**gl, &**gr) {
                    if self.equation_eq(a, b, c, d) {
                        return true;
                    }
                }
                (self.eq(pl, gl) && self.eq(pr, gr))
                    || (simple_lhs(pl) && simple_lhs(gl) && self.eq(pr, gr))
            }
            (Eq(l, r), x) if simple_lhs(l) => self.eq(r, x),
            (x, Eq(l, r)) if simple_lhs(l) => self.eq(x, r),
            (Rel(po, pl, pr), Rel(go, gl, gr)) => {
                (po == go && self.eq(pl, gl) && self.eq(pr, gr))
                    || (flip(po) == *go && self.eq(pl, gr) && self.eq(pr, gl))
            }
            (Rel(..), x) | (x, Rel(..)) => match (as_interval(p), as_interval(g)) {
                (Some(a), Some(b)) => self.eq(&a, &b),
                _ => {
                    let _ = x;
                    false
                }
            },
            _ => false,
        }
    }

    fn ordered(&mut self, a: &[Ans], b: &[Ans]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| self.eq(x, y))
    }

    fn unordered(&mut self, a: &[Ans], b: &[Ans]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        let mut used = vec![false; b.len()];
        'outer: for x in a {
            for (j, y) in b.iter().enumerate() {
                if !used[j] && self.eq(x, y) {
                    used[j] = true;
                    continue 'outer;
                }
            }
            return false;
        }
        true
    }
}

fn flip(op: &str) -> &'static str {
    match op {
        "lt" => "gt",
        "gt" => "lt",
        "le" => "ge",
        "ge" => "le",
        _ => "ne",
    }
}

/// `x > 3` as the interval `(3, \infty)`.
fn as_interval(a: &Ans) -> Option<Ans> {
    let Ans::Rel(op, l, r) = a else {
        return Some(a.clone()).filter(|a| matches!(a, Ans::Tuple(..) | Ans::Union(_)));
    };
    let is_var = |x: &Ans| matches!(x, Ans::Expr(Expr::Var(_)));
    let inf = || Ans::Expr(Expr::Inf);
    let ninf = || Ans::Expr(Expr::Neg(Box::new(Expr::Inf)));
    let (op, bound) = if is_var(l) {
        (*op, (**r).clone())
    } else if is_var(r) {
        (flip(op), (**l).clone())
    } else {
        return None;
    };
    Some(match op {
        "lt" => Ans::Tuple(b'(', b')', vec![ninf(), bound]),
        "le" => Ans::Tuple(b'(', b']', vec![ninf(), bound]),
        "gt" => Ans::Tuple(b'(', b')', vec![bound, inf()]),
        "ge" => Ans::Tuple(b'[', b')', vec![bound, inf()]),
        _ => return None,
    })
}

/// A left side that only names the answer: `x`, `k`, `f(x)`, `a_1`, `m_{max}`.
fn simple_lhs(a: &Ans) -> bool {
    match a {
        Ans::Expr(Expr::Var(_)) => true,
        Ans::Expr(Expr::Mul(f, x)) => {
            matches!(&**f, Expr::Var(v) if v.len() == 1)
                && matches!(&**x, Expr::Var(v) if v.len() == 1)
        }
        Ans::Tuple(b'(', b')', xs) => xs.iter().all(|x| matches!(x, Ans::Expr(Expr::Var(_)))),
        _ => false,
    }
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Whether the predicted answer `pred` is mathematically equivalent to the gold answer `gold`.
pub fn is_equivalent(pred: &str, gold: &str) -> bool {
    let p = clean(pred);
    let g = clean(gold);
    if p.text.is_empty() || g.text.is_empty() {
        return false;
    }
    let (ps, gs) = (squash(&p.text), squash(&g.text));
    if ps == gs {
        return true;
    }
    if p.text.len() > MAX_ANSWER_BYTES || g.text.len() > MAX_ANSWER_BYTES {
        return false;
    }
    let pa = parse_answer(&p.text, 0);
    let ga = parse_answer(&g.text, 0);
    let mut cmp = Cmp { steps: STEP_BUDGET };
    if cmp.eq(&pa, &ga) {
        return true;
    }
    percent_eq(&mut cmp, &p, &g, &pa, &ga)
}

/// `50\%` is 50 (the gold written without its sign) or 0.5.
fn percent_eq(cmp: &mut Cmp, p: &Cleaned, g: &Cleaned, pa: &Ans, ga: &Ans) -> bool {
    if !(p.percent || g.percent) {
        return false;
    }
    if let (Ans::Expr(a), Ans::Expr(b)) = (pa, ga) {
        let sp = if p.percent { 0.01 } else { 1.0 };
        let sg = if g.percent { 0.01 } else { 1.0 };
        return cmp.expr_eq(a, b, sp, sg);
    }
    false
}
