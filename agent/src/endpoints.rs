//! The bastion endpoints an agent may hold its session with: the one it enrolled on, the
//! others given at enrollment (`--bastion` repeated), and the local configuration's
//! `bastions`. The agent keeps one session; when it is lost or cannot be opened, the next
//! endpoint is tried (after the jittered backoff of the session loop, so that a dead node's
//! fleet does not stampede the survivor). A name resolving to several addresses is tried
//! address by address at each connection (see `tls::dial`).

/// The endpoints, in order, and the one in use.
#[derive(Debug, Clone)]
pub struct Endpoints {
    list: Vec<String>,
    current: usize,
}

impl Endpoints {
    /// `enrolled` first, then `others` and `configured`, each once.
    pub fn new(enrolled: &str, others: &[String], configured: &[String]) -> Self {
        let mut list: Vec<String> = Vec::new();
        for e in std::iter::once(enrolled)
            .chain(others.iter().map(String::as_str))
            .chain(configured.iter().map(String::as_str))
        {
            let e = e.trim();
            if !e.is_empty() && !list.iter().any(|x| x == e) {
                list.push(e.to_string());
            }
        }
        // A random first endpoint would spread a fleet, but the operator's order is kept:
        // the first is the one enrolled on, usually the nearest.
        Self { list, current: 0 }
    }

    /// The endpoint to dial now.
    pub fn current(&self) -> &str {
        self.list.get(self.current).map_or("", String::as_str)
    }

    /// The current endpoint failed: the next one (wrapping around).
    pub fn advance(&mut self) {
        if !self.list.is_empty() {
            self.current = (self.current + 1) % self.list.len();
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_dedup_and_rotation() {
        let mut e = Endpoints::new(
            "a:4443",
            &["b:4443".into(), "a:4443".into()],
            &["c:4443".into(), " b:4443".into()],
        );
        assert_eq!(e.len(), 3);
        let seen: Vec<String> = (0..4)
            .map(|_| {
                let c = e.current().to_string();
                e.advance();
                c
            })
            .collect();
        assert_eq!(seen, ["a:4443", "b:4443", "c:4443", "a:4443"]);
    }
}
