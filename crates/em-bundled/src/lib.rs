//! The data the project carries, embedded in every binary that links this crate: the screening
//! pools (the 1209-problem DeepScaleR subset the EM and One-shot RLVR references screen, and π1)
//! and the evaluation suites that no registry package provides (AMC23, OlympiadBench, AIME24,
//! AIME25), in the Qwen2.5-Math toolkit's own field layout. The files live in the repository's
//! `data/` folder; `data/README.md` gives each one's source, licence and sha256, and this crate's
//! tests check the bytes, the table and the item counts against each other.
//!
//! Embedding rather than looking the files up at run time is what lets a release binary built
//! anywhere find them anywhere: nothing resolves relative to the build machine's source tree.

/// What a bundled file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A screening pool: `{id, prompt: [chat messages], answer, data_source}` a line.
    Pool,
    /// An evaluation suite in the Qwen2.5-Math toolkit's layout.
    Suite,
}

/// One file of `data/`.
#[derive(Debug)]
pub struct Bundled {
    /// The name users type (`screen --pool dsr`, `eval --suites amc23`).
    pub name: &'static str,
    /// Other names accepted for it.
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    /// Its path under `data/`; its file name is what the loaders name the suite by.
    pub file: &'static str,
    /// Items (lines) it holds.
    pub items: usize,
    /// Hex sha256 of `bytes`, as `data/README.md` records it.
    pub sha256: &'static str,
    pub bytes: &'static [u8],
}

impl Bundled {
    /// The file name alone (`dsr_sub.jsonl`).
    pub fn file_name(&self) -> &'static str {
        self.file.rsplit('/').next().unwrap_or(self.file)
    }

    fn answers_to(&self, name: &str) -> bool {
        self.name == name || self.aliases.contains(&name)
    }
}

macro_rules! bundled {
    ($name:literal, [$($alias:literal),*], $kind:ident, $file:literal, $items:literal, $sha:literal) => {
        Bundled {
            name: $name,
            aliases: &[$($alias),*],
            kind: Kind::$kind,
            file: $file,
            items: $items,
            sha256: $sha,
            bytes: include_bytes!(concat!("../../../data/", $file)),
        }
    };
}

/// Every file of `data/`.
pub const ALL: &[Bundled] = &[
    bundled!(
        "dsr",
        ["dsr_sub"],
        Pool,
        "pool/dsr_sub.jsonl",
        1209,
        "b11aeae304ede4e249fd68070daccec2269fa6aa1b71db58f2c1f9b56cee6e3c"
    ),
    bundled!(
        "pi1",
        [],
        Pool,
        "pool/pi1.jsonl",
        1,
        "e0f1e0d2abe1217126f502debb2686899e90715704b7603bd75474ce0373065f"
    ),
    bundled!(
        "amc23",
        [],
        Suite,
        "bench/amc23.jsonl",
        40,
        "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4"
    ),
    bundled!(
        "olympiadbench",
        [],
        Suite,
        "bench/olympiadbench.jsonl",
        675,
        "bb8c1e38a16ea9eacb77530315a674d883f267fbff79183effc53681b4fcc416"
    ),
    bundled!(
        "aime24",
        [],
        Suite,
        "bench/aime24.jsonl",
        30,
        "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac"
    ),
    bundled!(
        "aime25",
        [],
        Suite,
        "bench/aime25.jsonl",
        30,
        "4613b7d3b5346f007625969f4380d932d6a2618fdcc9b89e5d39c7fbddc074b8"
    ),
];

/// The bundled pool called `name`, if any.
pub fn pool(name: &str) -> Option<&'static Bundled> {
    find(Kind::Pool, name)
}

/// The bundled suite called `name`, if any.
pub fn suite(name: &str) -> Option<&'static Bundled> {
    find(Kind::Suite, name)
}

/// The names of the bundled files of one kind, for messages.
pub fn names(kind: Kind) -> Vec<&'static str> {
    ALL.iter()
        .filter(|b| b.kind == kind)
        .map(|b| b.name)
        .collect()
}

fn find(kind: Kind, name: &str) -> Option<&'static Bundled> {
    ALL.iter().find(|b| b.kind == kind && b.answers_to(name))
}
