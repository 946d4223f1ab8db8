//! The virtio-fs config space (virtio 1.2, 5.11.4), served by the VMM rather
//! than asked of the back-end: the tag is ours to choose, and virtiofsd
//! offers its own only when started with `--tag`.

use super::FS_TAG_MAX_LEN;

/// `tag[36]` then `num_request_queues` (le32); no notify_buf_size, as we
/// offer no VIRTIO_FS_F_NOTIFICATION.
pub const CONFIG_SPACE_SIZE: usize = FS_TAG_MAX_LEN + 4;

/// Builds the config space. The tag is NUL-padded and not NUL-terminated
/// when it fills all 36 bytes; a longer tag (refused by the VMM's config
/// validation) is cut.
pub fn build(tag: &str, num_request_queues: u32) -> [u8; CONFIG_SPACE_SIZE] {
    let mut space = [0u8; CONFIG_SPACE_SIZE];
    let bytes = tag.as_bytes();
    let len = bytes.len().min(FS_TAG_MAX_LEN);
    space[..len].copy_from_slice(&bytes[..len]);
    space[FS_TAG_MAX_LEN..].copy_from_slice(&num_request_queues.to_le_bytes());
    space
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::util::read_config_bytes;

    #[test]
    fn layout_is_tag_then_queue_count() {
        let space = build("microvm-shared", 1);
        assert_eq!(&space[..14], b"microvm-shared");
        assert!(space[14..36].iter().all(|b| *b == 0));
        assert_eq!(&space[36..], &[1, 0, 0, 0]);
        let space = build(&"t".repeat(36), 0x0102_0304);
        assert_eq!(&space[..36], "t".repeat(36).as_bytes());
        assert_eq!(&space[36..], &[4, 3, 2, 1]);
    }

    #[test]
    fn reads_at_any_offset_and_past_the_end() {
        let space = build("abc", 2);
        let mut word = [0xffu8; 4];
        read_config_bytes(&space, 36, &mut word);
        assert_eq!(u32::from_le_bytes(word), 2);
        let mut one = [0xffu8; 1];
        read_config_bytes(&space, 1, &mut one);
        assert_eq!(one, [b'b']);
        let mut tail = [0xffu8; 8];
        read_config_bytes(&space, 38, &mut tail);
        assert_eq!(tail, [0; 8]);
        read_config_bytes(&space, u64::MAX, &mut tail);
        assert_eq!(tail, [0; 8]);
    }
}
