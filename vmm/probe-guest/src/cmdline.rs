//! The bits of the kernel command line the probe understands:
//! `probe.quick=1` and Linux's `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`
//! (QEMU microvm and our VMM both append one per device).

/// Whether `param` appears as a whole word.
pub fn has_param(cmdline: &[u8], param: &[u8]) -> bool {
    words(cmdline).any(|word| word == param)
}

/// One `virtio_mmio.device=` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceParam {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Every well-formed `virtio_mmio.device=` entry, in order; malformed ones
/// are skipped.
pub fn virtio_mmio_devices(cmdline: &[u8]) -> impl Iterator<Item = MmioDeviceParam> + '_ {
    const KEY: &[u8] = b"virtio_mmio.device=";
    words(cmdline)
        .filter_map(|word| word.strip_prefix(KEY))
        .filter_map(parse_device)
}

fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|word| !word.is_empty())
}

fn parse_device(value: &[u8]) -> Option<MmioDeviceParam> {
    let at = value.iter().position(|&b| b == b'@')?;
    let (size, rest) = (&value[..at], &value[at + 1..]);
    let mut fields = rest.split(|&b| b == b':');
    let base = memparse(fields.next()?)?;
    let irq = parse_number(fields.next()?)?;
    let size = memparse(size)?;
    if size == 0 {
        return None;
    }
    Some(MmioDeviceParam {
        base,
        size,
        irq: u32::try_from(irq).ok()?,
    })
}

/// Linux's `memparse`: a number (0x hex, leading-0 octal, else decimal) with
/// an optional K/M/G suffix.
fn memparse(text: &[u8]) -> Option<u64> {
    let (digits, shift) = match text.last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value = parse_number(digits)?;
    value.checked_mul(1u64 << shift)
}

fn parse_number(text: &[u8]) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = text
        .strip_prefix(b"0x")
        .or_else(|| text.strip_prefix(b"0X"))
    {
        (hex, 16)
    } else if text.len() > 1 && text[0] == b'0' {
        (&text[1..], 8)
    } else {
        (text, 10)
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = char::from(b).to_digit(radix)?;
        acc.checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_flag_matches_whole_words_only() {
        assert!(has_param(b"console=ttyS0 probe.quick=1", b"probe.quick=1"));
        assert!(!has_param(b"probe.quick=10", b"probe.quick=1"));
        assert!(!has_param(b"xprobe.quick=1", b"probe.quick=1"));
        assert!(!has_param(b"", b"probe.quick=1"));
    }

    #[test]
    fn parses_qemu_and_vmm_style_entries() {
        let line = b"console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 \
                     virtio_mmio.device=4K@0xd0001000:6:3\tvirtio_mmio.device=1M@3489660928:7";
        let found: std::vec::Vec<_> = virtio_mmio_devices(line).collect();
        assert_eq!(
            found,
            [
                MmioDeviceParam {
                    base: 0xfeb0_0e00,
                    size: 512,
                    irq: 12
                },
                MmioDeviceParam {
                    base: 0xd000_1000,
                    size: 4096,
                    irq: 6
                },
                MmioDeviceParam {
                    base: 0xd000_0000,
                    size: 1 << 20,
                    irq: 7
                },
            ]
        );
    }

    #[test]
    fn skips_malformed_entries() {
        let line = b"virtio_mmio.device=512 virtio_mmio.device=@0x1000:5 \
                     virtio_mmio.device=0@0x1000:5 virtio_mmio.device=4K@0xzz:5 \
                     virtio_mmio.device=4K@0x1000 virtio_mmio.device=4K@0x1000:99999999999 \
                     virtio_mmio.device=99999999999G@0x1000:5 virtio_mmio.device=4K@0x2000:010";
        let found: std::vec::Vec<_> = virtio_mmio_devices(line).collect();
        assert_eq!(
            found,
            [MmioDeviceParam {
                base: 0x2000,
                size: 4096,
                irq: 8
            }]
        );
    }
}
