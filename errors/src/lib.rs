//! One way to print an error for the whole runtime (VMM, devices, shim,
//! image builder): the message, then each source in turn, each level once
//! (Cloud Hypervisor's `docs/logging.md` rule). A `thiserror` message that
//! already embeds its source (`"...: {0}"`) is not repeated.

use std::error::Error;

/// `"outer: inner: innermost"`. A source whose text the chain so far
/// already contains is skipped, so an error that prints its source itself
/// does not show it twice.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;
    use std::fmt;

    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        source: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.text)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.source.as_deref().map(|s| s as _)
        }
    }

    fn layer(text: &'static str, source: Option<Layer>) -> Layer {
        Layer {
            text,
            source: source.map(Box::new),
        }
    }

    #[test]
    fn prints_every_level_in_order() {
        let err = layer(
            "cannot start the VM",
            Some(layer("cannot open /dev/kvm", Some(layer("EACCES", None)))),
        );
        assert_eq!(
            error_chain(&err),
            "cannot start the VM: cannot open /dev/kvm: EACCES"
        );
        assert_eq!(error_chain(&layer("alone", None)), "alone");
    }

    #[test]
    fn a_source_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let io_text = io.to_string();
        let err = layer(
            "outer: entity not found",
            Some(layer("entity not found", Some(layer("deepest", None)))),
        );
        assert_eq!(io_text, "entity not found");
        assert_eq!(error_chain(&err), "outer: entity not found: deepest");
    }
}
