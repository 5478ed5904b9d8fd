//! Deterministic completions: the answer text and its token count are a
//! function of (model, messages, max_tokens, temperature) only — never of
//! the org, the time or the fault RNG — so a job rerun after a crash
//! produces exactly the outputs of an undisturbed run, and tests can compare
//! the two.

use sha2::{Digest, Sha256};

/// The part of a chat request that decides its answer, normalised.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ChatCall {
    pub model: String,
    /// (role, text content) of each message.
    pub messages: Vec<(String, String)>,
    pub max_tokens: u64,
    pub temperature: Option<f64>,
}

/// A call's answer, decided before the call is admitted (its token count is
/// needed for the stats) while the text is only generated once it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Answer {
    /// `chatcmpl-…`, derived from the digest so it is as repeatable as the text.
    pub id: String,
    pub tokens: u64,
    /// `"length"` when the answer used all of max_tokens, else `"stop"`.
    pub finish_reason: &'static str,
    /// The text generator's state after drawing `tokens`.
    rng: SplitMix64,
}

impl Answer {
    /// About four characters of pseudo-text per token.
    pub(super) fn text(&self) -> String {
        pseudo_text(&mut self.rng.clone(), self.tokens as usize * 4)
    }
}

impl ChatCall {
    /// The prompt estimate OpenAI documents for what it charges at arrival:
    /// characters of all message contents / chars_per_token, rounded up.
    pub(super) fn prompt_tokens(&self, chars_per_token: f64) -> u64 {
        let chars: usize = self.messages.iter().map(|(_, c)| c.chars().count()).sum();
        (chars as f64 / chars_per_token).ceil() as u64
    }

    /// SHA-256 of the fields that decide the answer, each length-prefixed so
    /// that different requests cannot collide by shifting text between fields.
    pub(super) fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(self.model.as_bytes());
        for (role, content) in &self.messages {
            field(role.as_bytes());
            field(content.as_bytes());
        }
        field(&self.max_tokens.to_le_bytes());
        // Absent means OpenAI's default of 1, so both spellings answer alike.
        field(&self.temperature.unwrap_or(1.0).to_bits().to_le_bytes());
        h.finalize().into()
    }

    /// The answer: between max_tokens/2 and max_tokens tokens.
    pub(super) fn answer(&self) -> Answer {
        let digest = self.digest();
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&digest[..8]);
        let mut rng = SplitMix64(u64::from_le_bytes(seed));
        let max = self.max_tokens.max(1);
        let min = max.div_ceil(2);
        let tokens = min + rng.next() % (max - min + 1);
        Answer {
            id: format!("chatcmpl-{}", hex::encode(&digest[..12])),
            tokens,
            finish_reason: if tokens == max { "length" } else { "stop" },
            rng,
        }
    }
}

/// A tiny, fast PRNG: the text only has to look varied, not be random.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "from",
    "this",
    "they",
    "we",
    "river",
    "light",
    "city",
    "stone",
    "quiet",
    "morning",
    "signal",
    "garden",
    "window",
    "story",
    "engine",
    "harbor",
    "winter",
    "market",
    "letter",
    "bridge",
    "forest",
    "voice",
    "shadow",
    "careful",
    "bright",
    "slow",
    "ancient",
    "open",
    "small",
    "golden",
    "distant",
    "silver",
    "warm",
    "hidden",
    "walked",
    "found",
    "carried",
    "watched",
    "built",
    "remembered",
    "answered",
    "followed",
    "opened",
    "waited",
    "across",
    "beneath",
    "between",
    "toward",
    "after",
    "before",
    "until",
    "while",
    "because",
    "although",
];

/// Sentences of 5–14 words until at least `chars` characters.
fn pseudo_text(rng: &mut SplitMix64, chars: usize) -> String {
    let mut out = String::with_capacity(chars + 16);
    while out.len() < chars {
        if !out.is_empty() {
            out.push(' ');
        }
        let words = 5 + rng.next() % 10;
        for i in 0..words {
            let w = WORDS[(rng.next() % WORDS.len() as u64) as usize];
            if i == 0 {
                let mut cs = w.chars();
                if let Some(first) = cs.next() {
                    out.extend(first.to_uppercase());
                    out.push_str(cs.as_str());
                }
            } else {
                out.push(' ');
                out.push_str(w);
            }
        }
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(content: &str, max_tokens: u64, temperature: Option<f64>) -> ChatCall {
        ChatCall {
            model: "gpt-4o-mini".into(),
            messages: vec![("system".into(), "Be brief.".into()), ("user".into(), content.into())],
            max_tokens,
            temperature,
        }
    }

    #[test]
    fn answers_are_repeatable_and_depend_on_every_input() {
        let a = call("Write a story.", 200, Some(0.7));
        assert_eq!(a.answer(), a.answer());
        let base = a.answer().text();
        assert_eq!(a.answer().text(), base);
        assert_ne!(call("Write a poem.", 200, Some(0.7)).answer().text(), base);
        assert_ne!(call("Write a story.", 201, Some(0.7)).answer().text(), base);
        assert_ne!(call("Write a story.", 200, Some(0.2)).answer().text(), base);
        assert_eq!(call("x", 10, None).answer(), call("x", 10, Some(1.0)).answer());
        let mut other_model = a.clone();
        other_model.model = "gpt-4o".into();
        assert_ne!(other_model.answer().text(), base);
    }

    #[test]
    fn token_count_is_in_range_and_text_is_about_four_chars_per_token() {
        for i in 0..200 {
            let c = call(&format!("prompt {i}"), 1 + i * 7, None).answer();
            let max = 1 + i * 7;
            assert!(c.tokens >= max.div_ceil(2) && c.tokens <= max, "{} not in range for {max}", c.tokens);
            assert_eq!(c.finish_reason == "length", c.tokens == max);
            let text = c.text();
            let len = text.len() as u64;
            assert!(len >= c.tokens * 4 && len < c.tokens * 4 + 200, "{len} chars for {} tokens", c.tokens);
            assert!(text.ends_with('.') && text.chars().next().is_some_and(|ch| ch.is_uppercase()));
        }
    }

    #[test]
    fn prompt_estimate_rounds_up() {
        // "Be brief." (9) + "abc" (3) = 12 chars.
        assert_eq!(call("abc", 1, None).prompt_tokens(4.0), 3);
        assert_eq!(call("abcd", 1, None).prompt_tokens(4.0), 4);
        assert_eq!(call("é", 1, None).prompt_tokens(10.0), 1);
    }
}
