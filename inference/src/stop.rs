//! Stop strings, applied to streamed text the same way for every engine: text that could be the
//! start of a stop string is held back until it is clearly not one, so a stop string never
//! reaches the caller, even when it arrives split over several tokens.

#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Self::default() }
    }

    /// Feeds one generated piece; returns the text that may be emitted now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            self.stopped = true;
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        let hold = self.held_suffix();
        let emit_to = self.pending.len() - hold;
        let rest = self.pending.split_off(emit_to);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Whether a stop string was seen (generation should end).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text still held back, once generation has ended without a stop string.
    pub fn finish(&mut self) -> String {
        if self.stopped { String::new() } else { std::mem::take(&mut self.pending) }
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix(&self) -> usize {
        self.stops.iter().map(|stop| held_prefix(&self.pending, stop)).max().unwrap_or(0)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `word`: text that may be
/// the start of `word` and must be held until the next piece says.
pub(crate) fn held_prefix(text: &str, word: &str) -> usize {
    (1..word.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && word.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut f = StopFilter::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out.push_str(&f.push(p));
            if f.stopped() {
                break;
            }
        }
        out.push_str(&f.finish());
        (out, f.stopped())
    }

    #[test]
    fn text_without_stop_strings_passes_unchanged() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["END"], &["hello ", "world"]), ("hello world".into(), false));
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_cut_with_everything_after_it() {
        assert_eq!(run(&["END"], &["one E", "N", "D two"]), ("one ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_be_a_stop() {
        let stops = vec!["END".to_string()];
        let mut f = StopFilter::new(&stops);
        assert_eq!(f.push("x EN"), "x ");
        assert_eq!(f.push("Z"), "ENZ");
        assert_eq!(f.push("EN"), "");
        assert_eq!(f.finish(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        assert_eq!(run(&["b", "a"], &["xxabyy"]), ("xx".into(), true));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éz"], &["caféé"]), ("caféé".into(), false));
    }
}
