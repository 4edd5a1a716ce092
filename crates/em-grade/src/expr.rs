//! A small LaTeX math expression parser and complex evaluator.

use std::collections::BTreeSet;

/// Deepest nesting the parser accepts.
const MAX_DEPTH: usize = 48;

/// Functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Func {
    Sin,
    Cos,
    Tan,
    Sec,
    Csc,
    Cot,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Ln,
    Exp,
    Abs,
    Floor,
    Ceil,
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    /// An exact number (integer, fraction part, terminating decimal written exactly).
    Num(f64),
    /// A decimal literal with a fractional part: possibly an approximation.
    Dec(f64),
    Var(String),
    Pi,
    E,
    I,
    Inf,
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Func(Func, Box<Expr>),
    Log(Box<Expr>, Box<Expr>),
    Root(Box<Expr>, Box<Expr>),
    Fact(Box<Expr>),
    Binom(Box<Expr>, Box<Expr>),
}

fn bx(e: Expr) -> Box<Expr> {
    Box::new(e)
}

/// Parse a whole string as one expression; `pm` is the sign that `\pm` takes (`\mp` the other).
pub(crate) fn parse(s: &str, pm: f64) -> Option<Expr> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
        depth: 0,
        pm,
        abs: 0,
    };
    let e = p.expr()?;
    p.ws();
    if p.i == p.s.len() {
        Some(e)
    } else {
        None
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
    pm: f64,
    abs: usize,
}

const FUNCS: &[(&str, Func)] = &[
    ("sin", Func::Sin),
    ("cos", Func::Cos),
    ("tan", Func::Tan),
    ("sec", Func::Sec),
    ("csc", Func::Csc),
    ("cot", Func::Cot),
    ("arcsin", Func::Asin),
    ("arccos", Func::Acos),
    ("arctan", Func::Atan),
    ("asin", Func::Asin),
    ("acos", Func::Acos),
    ("atan", Func::Atan),
    ("sinh", Func::Sinh),
    ("cosh", Func::Cosh),
    ("tanh", Func::Tanh),
    ("ln", Func::Ln),
    ("exp", Func::Exp),
    ("abs", Func::Abs),
];

/// Commands that end a factor (operators, closers, relations).
const STOPS: &[&str] = &[
    "cdot",
    "times",
    "div",
    "pm",
    "mp",
    "rfloor",
    "rceil",
    "cup",
    "cap",
    "in",
    "le",
    "ge",
    "ne",
    "lt",
    "gt",
    "to",
    "end",
    "approx",
    "quad",
    "qquad",
    "Rightarrow",
    "implies",
    "right",
    "land",
    "lor",
    "wedge",
    "vee",
    "}",
    "{",
    "setminus",
    "mid",
];

/// Whether `word` (ASCII letters) names a function the parser knows.
pub(crate) fn is_func_name(word: &str) -> bool {
    FUNCS.iter().any(|(n, _)| *n == word) || matches!(word, "log" | "sqrt" | "lg")
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i] == b' ' {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.i).copied()
    }
    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }
    /// The command name at the cursor (after `\`), without consuming it.
    fn cmd_at(&self, at: usize) -> Option<&'a str> {
        let s = self.s;
        if s.get(at) != Some(&b'\\') {
            return None;
        }
        let mut j = at + 1;
        while j < s.len() && s[j].is_ascii_alphabetic() {
            j += 1;
        }
        if j == at + 1 {
            j = (at + 2).min(s.len());
        }
        std::str::from_utf8(&s[at + 1..j]).ok()
    }
    fn eat_cmd(&mut self) -> Option<&'a str> {
        self.ws();
        let c = self.cmd_at(self.i)?;
        self.i += 1 + c.len();
        Some(c)
    }
    /// Raw text of one LaTeX argument: `{…}` contents, a command, or one character.
    fn raw_arg(&mut self) -> Option<&'a [u8]> {
        self.ws();
        let s = self.s;
        let c = *s.get(self.i)?;
        if c == b'{' {
            let close = crate::normalize::match_brace(s, self.i)?;
            let r = &s[self.i + 1..close];
            self.i = close + 1;
            Some(r)
        } else if c == b'\\' {
            let name = self.cmd_at(self.i)?;
            let r = &s[self.i..self.i + 1 + name.len()];
            self.i += 1 + name.len();
            Some(r)
        } else if c == b'}' {
            None
        } else {
            let start = self.i;
            self.i += 1;
            while self.i < s.len() && (s[self.i] & 0xC0) == 0x80 {
                self.i += 1;
            }
            Some(&s[start..self.i])
        }
    }
    fn sub(&mut self, raw: &[u8]) -> Option<Expr> {
        let mut p = Parser {
            s: raw,
            i: 0,
            depth: self.depth + 1,
            pm: self.pm,
            abs: 0,
        };
        if p.depth > MAX_DEPTH {
            return None;
        }
        let e = p.expr()?;
        p.ws();
        (p.i == p.s.len()).then_some(e)
    }
    fn arg(&mut self) -> Option<Expr> {
        let raw = self.raw_arg()?;
        self.sub(raw)
    }

    fn expr(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut lhs = self.term()?;
        loop {
            match self.peek() {
                Some(b'+') => {
                    self.i += 1;
                    lhs = Expr::Add(bx(lhs), bx(self.term()?));
                }
                Some(b'-') => {
                    self.i += 1;
                    lhs = Expr::Sub(bx(lhs), bx(self.term()?));
                }
                Some(b'\\') if matches!(self.cmd_at(self.i), Some("pm") | Some("mp")) => {
                    let c = self.eat_cmd()?;
                    let sign = if c == "pm" { self.pm } else { -self.pm };
                    let r = self.term()?;
                    lhs = if sign > 0.0 {
                        Expr::Add(bx(lhs), bx(r))
                    } else {
                        Expr::Sub(bx(lhs), bx(r))
                    };
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Some(lhs)
    }

    fn starts_factor(&mut self) -> bool {
        let Some(c) = self.peek() else { return false };
        match c {
            b'0'..=b'9' | b'.' | b'(' | b'[' | b'{' => true,
            b'a'..=b'z' | b'A'..=b'Z' => true,
            b'|' => self.abs == 0,
            b'\\' => match self.cmd_at(self.i) {
                Some(c) => !STOPS.contains(&c),
                None => false,
            },
            _ => false,
        }
    }

    fn term(&mut self) -> Option<Expr> {
        self.enter()?;
        let first_start = self.peek();
        let mut lhs = self.unary()?;
        let mut single_int =
            first_start.is_some_and(|c| c.is_ascii_digit() || c == b'-') && is_int_lit(&lhs);
        loop {
            match self.peek() {
                Some(b'*') => {
                    self.i += 1;
                    lhs = Expr::Mul(bx(lhs), bx(self.unary()?));
                }
                Some(b'/') => {
                    self.i += 1;
                    lhs = Expr::Div(bx(lhs), bx(self.unary()?));
                }
                Some(b'\\') if matches!(self.cmd_at(self.i), Some("cdot") | Some("times")) => {
                    self.eat_cmd();
                    lhs = Expr::Mul(bx(lhs), bx(self.unary()?));
                }
                Some(b'\\') if self.cmd_at(self.i) == Some("div") => {
                    self.eat_cmd();
                    lhs = Expr::Div(bx(lhs), bx(self.unary()?));
                }
                _ if self.starts_factor() => {
                    let is_frac = self.cmd_at(self.i) == Some("frac");
                    let rhs = self.power()?;
                    if single_int && is_frac {
                        if let Expr::Div(a, b) = &rhs {
                            if let (Expr::Num(a), Expr::Num(b)) = (a.as_ref(), b.as_ref()) {
                                if a.fract() == 0.0 && b.fract() == 0.0 {
                                    // mixed number: 137 \frac12 = 137 + 1/2
                                    let (neg, whole) = match &lhs {
                                        Expr::Neg(x) => (true, x.as_ref().clone()),
                                        x => (false, x.clone()),
                                    };
                                    let m = Expr::Add(bx(whole), bx(rhs.clone()));
                                    lhs = if neg { Expr::Neg(bx(m)) } else { m };
                                    single_int = false;
                                    continue;
                                }
                            }
                        }
                    }
                    lhs = Expr::Mul(bx(lhs), bx(rhs));
                }
                _ => break,
            }
            single_int = false;
        }
        self.depth -= 1;
        Some(lhs)
    }

    fn unary(&mut self) -> Option<Expr> {
        self.enter()?;
        let r = match self.peek() {
            Some(b'-') => {
                self.i += 1;
                Expr::Neg(bx(self.unary()?))
            }
            Some(b'+') => {
                self.i += 1;
                self.unary()?
            }
            _ => self.power()?,
        };
        self.depth -= 1;
        Some(r)
    }

    fn postfix(&mut self, mut e: Expr) -> Expr {
        while self.peek() == Some(b'!') && self.s.get(self.i + 1) != Some(&b'=') {
            self.i += 1;
            e = Expr::Fact(bx(e));
        }
        e
    }

    fn exponent(&mut self) -> Option<Expr> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'-') | Some(b'+') => {
                // x^-1: a signed single token
                let neg = self.s[self.i] == b'-';
                self.i += 1;
                let e = self.arg()?;
                Some(if neg { Expr::Neg(bx(e)) } else { e })
            }
            // `2^10` as written in plain text means 2^{10}
            Some(c) if c.is_ascii_digit() => self.number(),
            _ => self.arg(),
        }
    }

    fn power(&mut self) -> Option<Expr> {
        self.enter()?;
        let base = self.atom()?;
        let mut base = self.postfix(base);
        if self.peek() == Some(b'^') {
            self.i += 1;
            let ex = self.exponent()?;
            base = Expr::Pow(bx(base), bx(ex));
            base = self.postfix(base);
        }
        self.depth -= 1;
        Some(base)
    }

    fn number(&mut self) -> Option<Expr> {
        let s = self.s;
        let start = self.i;
        while self.i < s.len() && s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        let int_end = self.i;
        let mut frac_nonzero = false;
        let mut has_dot = false;
        if self.i < s.len()
            && s[self.i] == b'.'
            && s.get(self.i + 1).is_some_and(|c| c.is_ascii_digit())
        {
            has_dot = true;
            self.i += 1;
            while self.i < s.len() && s[self.i].is_ascii_digit() {
                frac_nonzero |= s[self.i] != b'0';
                self.i += 1;
            }
        } else if self.i < s.len() && s[self.i] == b'.' && int_end > start {
            // "3." : trailing point
            self.i += 1;
            has_dot = true;
        }
        let mant_end = self.i;
        // scientific notation: 4.5e33, 1e-3
        let mut exp: i32 = 0;
        if self.i < s.len() && (s[self.i] == b'e' || s[self.i] == b'E') {
            let mut j = self.i + 1;
            if j < s.len() && (s[j] == b'-' || s[j] == b'+') {
                j += 1;
            }
            if j < s.len() && s[j].is_ascii_digit() {
                let es = j;
                while j < s.len() && s[j].is_ascii_digit() && j - es < 5 {
                    j += 1;
                }
                let txt = std::str::from_utf8(&s[self.i + 1..j]).ok()?;
                exp = txt.parse().ok()?;
                self.i = j;
            }
        }
        let txt = std::str::from_utf8(&s[start..mant_end]).ok()?;
        let txt = txt.trim_end_matches('.');
        if txt.is_empty() {
            return None;
        }
        let lit = if txt.starts_with('.') {
            format!("0{txt}e{exp}")
        } else {
            format!("{txt}e{exp}")
        };
        let v: f64 = lit.parse().ok()?;
        // repeating decimal 0.\overline{3}
        if has_dot && self.cmd_at(self.i) == Some("overline") {
            let save = self.i;
            self.eat_cmd();
            if let Some(raw) = self.raw_arg() {
                if !raw.is_empty() && raw.iter().all(|c| c.is_ascii_digit()) && raw.len() < 12 {
                    let dec_digits = mant_end - int_end - 1;
                    let rep: f64 = std::str::from_utf8(raw).ok()?.parse().ok()?;
                    let r = raw.len() as i32;
                    let add = rep / (10f64.powi(r) - 1.0) / 10f64.powi(dec_digits as i32);
                    return Some(Expr::Num(v + add));
                }
            }
            self.i = save;
        }
        // base subscript: 204_5, 4210_{5}
        if !has_dot && exp == 0 && self.s.get(self.i) == Some(&b'_') {
            let save = self.i;
            self.i += 1;
            if let Some(raw) = self.raw_arg() {
                let bs = std::str::from_utf8(raw).ok().map(|x| x.trim());
                if let Some(base) = bs.and_then(|x| x.parse::<u32>().ok()) {
                    if (2..=36).contains(&base) {
                        if let Ok(n) = u64::from_str_radix(txt, base) {
                            return Some(Expr::Num(n as f64));
                        }
                    }
                }
            }
            self.i = save;
        }
        Some(if frac_nonzero {
            Expr::Dec(v)
        } else {
            Expr::Num(v)
        })
    }

    fn group(&mut self, close: u8) -> Option<Expr> {
        self.i += 1;
        let saved_abs = self.abs;
        self.abs = 0;
        let e = self.expr()?;
        self.abs = saved_abs;
        if self.peek() == Some(close) {
            self.i += 1;
            Some(e)
        } else {
            None
        }
    }

    /// Argument of a function written without braces: `\sin 2x`, `\sin(x)`, `\log_2 8`.
    fn func_arg(&mut self) -> Option<Expr> {
        match self.peek() {
            Some(b'(') | Some(b'{') | Some(b'[') => self.atom(),
            _ => {
                let mut e = self.power()?;
                while self.starts_factor()
                    && !matches!(self.peek(), Some(b'\\') | Some(b'(') | Some(b'|'))
                {
                    e = Expr::Mul(bx(e), bx(self.power()?));
                }
                Some(e)
            }
        }
    }

    fn atom(&mut self) -> Option<Expr> {
        self.enter()?;
        let c = self.peek()?;
        let r = match c {
            b'0'..=b'9' | b'.' => self.number()?,
            b'(' => self.group(b')')?,
            b'[' => self.group(b']')?,
            b'{' => self.group(b'}')?,
            b'|' => {
                self.i += 1;
                self.abs += 1;
                let e = self.expr()?;
                self.abs -= 1;
                if self.peek() != Some(b'|') {
                    return None;
                }
                self.i += 1;
                Expr::Func(Func::Abs, bx(e))
            }
            b'a'..=b'z' | b'A'..=b'Z' => self.letters()?,
            b'\\' => self.command()?,
            _ => return None,
        };
        self.depth -= 1;
        Some(r)
    }

    fn letters(&mut self) -> Option<Expr> {
        let s = self.s;
        // plain function names: sin(x), sqrt(2), log(3)
        let mut j = self.i;
        while j < s.len() && s[j].is_ascii_alphabetic() {
            j += 1;
        }
        let word = std::str::from_utf8(&s[self.i..j]).ok()?;
        if word.len() > 1 {
            for k in (2..=word.len()).rev() {
                let w = &word[..k];
                if is_func_name(w)
                    && s.get(self.i + k)
                        .is_some_and(|c| matches!(c, b'(' | b' ' | b'{'))
                {
                    self.i += k;
                    return self.apply_func(w);
                }
            }
        }
        let c = s[self.i];
        self.i += 1;
        let mut name = String::from(c as char);
        if self.s.get(self.i) == Some(&b'_') {
            self.i += 1;
            let raw = self.raw_arg()?;
            name.push('_');
            name.extend(
                raw.iter()
                    .filter(|c| !c.is_ascii_whitespace() && **c != b'{' && **c != b'}')
                    .map(|&c| c as char),
            );
        }
        while self.s.get(self.i) == Some(&b'\'') {
            self.i += 1;
            name.push('\'');
        }
        Some(match name.as_str() {
            "e" => Expr::E,
            "i" => Expr::I,
            _ => Expr::Var(name),
        })
    }

    fn apply_func(&mut self, name: &str) -> Option<Expr> {
        match name {
            "sqrt" => {
                let a = self.func_arg()?;
                return Some(Expr::Root(bx(Expr::Num(2.0)), bx(a)));
            }
            "log" | "lg" => {
                let mut base = if name == "lg" {
                    Expr::Num(10.0)
                } else {
                    Expr::E
                };
                if self.peek() == Some(b'_') {
                    self.i += 1;
                    base = self.arg()?;
                }
                let pw = self.func_power()?;
                let a = self.func_arg()?;
                let e = Expr::Log(bx(base), bx(a));
                return Some(match pw {
                    Some(p) => Expr::Pow(bx(e), bx(p)),
                    None => e,
                });
            }
            _ => {}
        }
        let f = FUNCS.iter().find(|(n, _)| *n == name)?.1;
        let pw = self.func_power()?;
        let inverse = matches!(&pw, Some(Expr::Neg(x)) if **x == Expr::Num(1.0));
        let f = if inverse {
            match f {
                Func::Sin => Func::Asin,
                Func::Cos => Func::Acos,
                Func::Tan => Func::Atan,
                _ => return None,
            }
        } else {
            f
        };
        let a = self.func_arg()?;
        let e = Expr::Func(f, bx(a));
        Some(match pw {
            Some(p) if !inverse => Expr::Pow(bx(e), bx(p)),
            _ => e,
        })
    }

    /// `\sin^2` power between a function name and its argument.
    fn func_power(&mut self) -> Option<Option<Expr>> {
        if self.peek() == Some(b'^') {
            self.i += 1;
            Some(Some(self.exponent()?))
        } else {
            Some(None)
        }
    }

    fn command(&mut self) -> Option<Expr> {
        let name = self.eat_cmd()?;
        Some(match name {
            "frac" | "over" => {
                let a = self.arg()?;
                let b = self.arg()?;
                Expr::Div(bx(a), bx(b))
            }
            "sqrt" => {
                let mut n = Expr::Num(2.0);
                if self.peek() == Some(b'[') {
                    let close = self.s[self.i..].iter().position(|&c| c == b']')? + self.i;
                    let raw = &self.s[self.i + 1..close];
                    self.i = close + 1;
                    n = self.sub(raw)?;
                }
                let a = self.arg()?;
                Expr::Root(bx(n), bx(a))
            }
            "binom" | "choose" => {
                let a = self.arg()?;
                let b = self.arg()?;
                Expr::Binom(bx(a), bx(b))
            }
            "pi" => Expr::Pi,
            "infty" | "infin" => Expr::Inf,
            "lfloor" | "lceil" => {
                let e = self.expr()?;
                let want = if name == "lfloor" { "rfloor" } else { "rceil" };
                if self.peek() != Some(b'\\') || self.cmd_at(self.i) != Some(want) {
                    return None;
                }
                self.eat_cmd();
                Expr::Func(
                    if name == "lfloor" {
                        Func::Floor
                    } else {
                        Func::Ceil
                    },
                    bx(e),
                )
            }
            "log" | "lg" | "ln" | "exp" | "sin" | "cos" | "tan" | "sec" | "csc" | "cot"
            | "arcsin" | "arccos" | "arctan" | "sinh" | "cosh" | "tanh" => self.apply_func(name)?,
            "operatorname" | "mathrm" | "text" | "mathit" | "mathbf" | "textrm" | "mbox" | "rm" => {
                let raw = self.raw_arg()?;
                let w = std::str::from_utf8(raw).ok()?.trim();
                if is_func_name(w) {
                    self.apply_func(w)?
                } else if w.len() == 1 || w.is_empty() {
                    if w.is_empty() {
                        return None;
                    }
                    self.sub(raw)?
                } else {
                    Expr::Var(w.to_string())
                }
            }
            "dot" | "ddot" | "hat" | "bar" | "vec" | "tilde" | "overline" | "widehat"
            | "mathcal" | "mathbb" | "overrightarrow" => {
                let raw = self.raw_arg()?;
                let inner: String = raw
                    .iter()
                    .filter(|c| !c.is_ascii_whitespace())
                    .map(|&c| c as char)
                    .collect();
                Expr::Var(format!("{name}({inner})"))
            }
            n if STOPS.contains(&n) => return None,
            n if n.len() == 1 && !n.as_bytes()[0].is_ascii_alphabetic() => return None,
            n => {
                let mut v = n.to_string();
                if self.s.get(self.i) == Some(&b'_') {
                    self.i += 1;
                    let raw = self.raw_arg()?;
                    v.push('_');
                    v.extend(
                        raw.iter()
                            .filter(|c| !c.is_ascii_whitespace() && **c != b'{' && **c != b'}')
                            .map(|&c| c as char),
                    );
                }
                Expr::Var(v)
            }
        })
    }
}

fn is_int_lit(e: &Expr) -> bool {
    match e {
        Expr::Num(v) => v.fract() == 0.0,
        Expr::Neg(x) => matches!(x.as_ref(), Expr::Num(v) if v.fract() == 0.0),
        _ => false,
    }
}

/// Free variables of `e`.
pub(crate) fn vars(e: &Expr, out: &mut BTreeSet<String>) {
    match e {
        Expr::Var(v) => {
            out.insert(v.clone());
        }
        Expr::Num(_) | Expr::Dec(_) | Expr::Pi | Expr::E | Expr::I | Expr::Inf => {}
        Expr::Neg(a) | Expr::Func(_, a) | Expr::Fact(a) => vars(a, out),
        Expr::Add(a, b)
        | Expr::Sub(a, b)
        | Expr::Mul(a, b)
        | Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::Log(a, b)
        | Expr::Root(a, b)
        | Expr::Binom(a, b) => {
            vars(a, out);
            vars(b, out);
        }
    }
}

/// Whether `e` holds a decimal literal (so it may be an approximation).
pub(crate) fn has_decimal(e: &Expr) -> bool {
    any(e, &|x| matches!(x, Expr::Dec(_)))
}

/// Whether `e` needs integer arguments (floor, ceiling, factorial, binomial).
pub(crate) fn is_integer_flavoured(e: &Expr) -> bool {
    any(e, &|x| {
        matches!(
            x,
            Expr::Fact(_) | Expr::Binom(..) | Expr::Func(Func::Floor | Func::Ceil, _)
        )
    })
}

fn any(e: &Expr, f: &dyn Fn(&Expr) -> bool) -> bool {
    if f(e) {
        return true;
    }
    match e {
        Expr::Neg(a) | Expr::Func(_, a) | Expr::Fact(a) => any(a, f),
        Expr::Add(a, b)
        | Expr::Sub(a, b)
        | Expr::Mul(a, b)
        | Expr::Div(a, b)
        | Expr::Pow(a, b)
        | Expr::Log(a, b)
        | Expr::Root(a, b)
        | Expr::Binom(a, b) => any(a, f) || any(b, f),
        _ => false,
    }
}

/// A complex number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct C {
    pub re: f64,
    pub im: f64,
}

const NAN: C = C {
    re: f64::NAN,
    im: f64::NAN,
};

impl C {
    pub(crate) fn real(re: f64) -> C {
        C { re, im: 0.0 }
    }
    pub(crate) fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }
    fn is_real(self) -> bool {
        self.im == 0.0 || self.im.abs() <= 1e-12 * self.re.abs().max(1.0)
    }
    pub(crate) fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }
    fn add(self, o: C) -> C {
        C {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    fn sub(self, o: C) -> C {
        C {
            re: self.re - o.re,
            im: self.im - o.im,
        }
    }
    fn mul(self, o: C) -> C {
        if self.im == 0.0 && o.im == 0.0 {
            return C::real(self.re * o.re);
        }
        C {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
    fn div(self, o: C) -> C {
        if self.im == 0.0 && o.im == 0.0 {
            return C::real(self.re / o.re);
        }
        let d = o.re * o.re + o.im * o.im;
        C {
            re: (self.re * o.re + self.im * o.im) / d,
            im: (self.im * o.re - self.re * o.im) / d,
        }
    }
    fn exp(self) -> C {
        let r = self.re.exp();
        if self.im == 0.0 {
            return C::real(r);
        }
        C {
            re: r * self.im.cos(),
            im: r * self.im.sin(),
        }
    }
    fn ln(self) -> C {
        if self.im == 0.0 && self.re > 0.0 {
            return C::real(self.re.ln());
        }
        C {
            re: self.abs().ln(),
            im: self.im.atan2(self.re),
        }
    }
    fn powc(self, e: C) -> C {
        if e.im == 0.0 && e.re.fract() == 0.0 && e.re.abs() <= 64.0 {
            let mut n = e.re.abs() as u32;
            let mut base = self;
            let mut acc = C::real(1.0);
            while n > 0 {
                if n & 1 == 1 {
                    acc = acc.mul(base);
                }
                base = base.mul(base);
                n >>= 1;
            }
            return if e.re < 0.0 {
                C::real(1.0).div(acc)
            } else {
                acc
            };
        }
        if self.im == 0.0 && e.im == 0.0 && self.re >= 0.0 {
            return C::real(self.re.powf(e.re));
        }
        if self.re == 0.0 && self.im == 0.0 {
            return if e.re > 0.0 { C::real(0.0) } else { NAN };
        }
        self.ln().mul(e).exp()
    }
    fn sin(self) -> C {
        if self.im == 0.0 {
            return C::real(self.re.sin());
        }
        C {
            re: self.re.sin() * self.im.cosh(),
            im: self.re.cos() * self.im.sinh(),
        }
    }
    fn cos(self) -> C {
        if self.im == 0.0 {
            return C::real(self.re.cos());
        }
        C {
            re: self.re.cos() * self.im.cosh(),
            im: -self.re.sin() * self.im.sinh(),
        }
    }
}

/// Evaluation context: variable values and a step budget.
pub(crate) struct Env<'a> {
    pub names: &'a [String],
    pub values: &'a [C],
    pub steps: &'a mut u64,
}

/// Evaluate `e`; NaN where undefined or when the step budget is spent.
pub(crate) fn eval(e: &Expr, env: &mut Env) -> C {
    if *env.steps == 0 {
        return NAN;
    }
    *env.steps -= 1;
    match e {
        Expr::Num(v) | Expr::Dec(v) => C::real(*v),
        Expr::Pi => C::real(std::f64::consts::PI),
        Expr::E => C::real(std::f64::consts::E),
        Expr::I => C { re: 0.0, im: 1.0 },
        Expr::Inf => C::real(f64::INFINITY),
        Expr::Var(v) => match env.names.iter().position(|n| n == v) {
            Some(k) => env.values[k],
            None => NAN,
        },
        Expr::Add(a, b) => eval(a, env).add(eval(b, env)),
        Expr::Sub(a, b) => eval(a, env).sub(eval(b, env)),
        Expr::Mul(a, b) => eval(a, env).mul(eval(b, env)),
        Expr::Div(a, b) => {
            let d = eval(b, env);
            if d.re == 0.0 && d.im == 0.0 {
                return NAN;
            }
            eval(a, env).div(d)
        }
        Expr::Neg(a) => {
            let v = eval(a, env);
            C {
                re: -v.re,
                im: -v.im,
            }
        }
        Expr::Pow(a, b) => {
            let x = eval(a, env);
            let y = eval(b, env);
            x.powc(y)
        }
        Expr::Root(n, a) => {
            let n = eval(n, env);
            let x = eval(a, env);
            if !n.is_real() || n.re == 0.0 {
                return NAN;
            }
            let n = n.re;
            if x.is_real() && x.re < 0.0 && n.fract() == 0.0 && (n as i64) % 2 != 0 {
                return C::real(-(-x.re).powf(1.0 / n));
            }
            if x.is_real() && x.re >= 0.0 {
                return C::real(x.re.powf(1.0 / n));
            }
            x.powc(C::real(1.0 / n))
        }
        Expr::Log(b, a) => {
            let b = eval(b, env).ln();
            let a = eval(a, env).ln();
            if b.re == 0.0 && b.im == 0.0 {
                return NAN;
            }
            a.div(b)
        }
        Expr::Fact(a) => {
            let x = eval(a, env);
            if !x.is_real() || x.re < 0.0 || x.re.fract() != 0.0 || x.re > 170.0 {
                return NAN;
            }
            let mut p = 1.0;
            for k in 2..=(x.re as u32) {
                p *= k as f64;
            }
            C::real(p)
        }
        Expr::Binom(n, k) => {
            let n = eval(n, env);
            let k = eval(k, env);
            if !k.is_real() || k.re < 0.0 || k.re.fract() != 0.0 || k.re > 1000.0 {
                return NAN;
            }
            let mut acc = C::real(1.0);
            for j in 0..(k.re as u32) {
                let j = j as f64;
                acc = acc.mul(n.sub(C::real(j))).div(C::real(j + 1.0));
            }
            acc
        }
        Expr::Func(f, a) => {
            let x = eval(a, env);
            func(*f, x)
        }
    }
}

fn func(f: Func, x: C) -> C {
    let one = C::real(1.0);
    let real = |g: fn(f64) -> f64| if x.is_real() { C::real(g(x.re)) } else { NAN };
    match f {
        Func::Sin => x.sin(),
        Func::Cos => x.cos(),
        Func::Tan => x.sin().div(x.cos()),
        Func::Sec => one.div(x.cos()),
        Func::Csc => one.div(x.sin()),
        Func::Cot => x.cos().div(x.sin()),
        Func::Asin => real(f64::asin),
        Func::Acos => real(f64::acos),
        Func::Atan => real(f64::atan),
        Func::Sinh => x
            .exp()
            .sub(
                C {
                    re: -x.re,
                    im: -x.im,
                }
                .exp(),
            )
            .div(C::real(2.0)),
        Func::Cosh => x
            .exp()
            .add(
                C {
                    re: -x.re,
                    im: -x.im,
                }
                .exp(),
            )
            .div(C::real(2.0)),
        Func::Tanh => {
            let a = x.exp();
            let b = C {
                re: -x.re,
                im: -x.im,
            }
            .exp();
            a.sub(b).div(a.add(b))
        }
        Func::Ln => {
            if x.re == 0.0 && x.im == 0.0 {
                NAN
            } else {
                x.ln()
            }
        }
        Func::Exp => x.exp(),
        Func::Abs => C::real(x.abs()),
        Func::Floor => real(f64::floor),
        Func::Ceil => real(f64::ceil),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(s: &str) -> f64 {
        let e = parse(s, 1.0).unwrap_or_else(|| panic!("parse {s}"));
        let mut steps = 10_000;
        let mut env = Env {
            names: &[],
            values: &[],
            steps: &mut steps,
        };
        eval(&e, &mut env).re
    }

    #[test]
    fn evaluates() {
        assert_eq!(val("\\frac{1}{2}"), 0.5);
        assert_eq!(val("\\frac12"), 0.5);
        assert_eq!(val("\\frac9{19}"), 9.0 / 19.0);
        assert_eq!(val("137 \\frac{1}{2}"), 137.5);
        assert_eq!(val("-1\\frac{4}{5}"), -1.8);
        assert_eq!(val("2\\sqrt{3}"), 2.0 * 3f64.sqrt());
        assert_eq!(val("\\sqrt[3]{-8}"), -2.0);
        assert_eq!(val("4.5e33"), 4.5e33);
        assert!((val("4.5\\times10^{33}") / 4.5e33 - 1.0).abs() < 1e-12);
        assert_eq!(val("204_5"), 54.0);
        assert_eq!(val("2^{10}"), 1024.0);
        assert_eq!(val("2^10"), 1024.0);
        assert_eq!(val("5!"), 120.0);
        assert_eq!(val("\\binom{5}{2}"), 10.0);
        assert!((val("0.\\overline{3}") - 1.0 / 3.0).abs() < 1e-15);
        assert!((val("\\sin^2 x + 1") - 0.0).is_nan());
        assert!((val("\\log_2 8") - 3.0).abs() < 1e-12);
        assert_eq!(val("|-3|"), 3.0);
        assert_eq!(val("\\lfloor 2.5 \\rfloor"), 2.0);
        assert!(parse("1+", 1.0).is_none());
        assert!(parse("((((", 1.0).is_none());
    }
}
