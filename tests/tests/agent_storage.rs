//! Storage mounts through the agent: a virtio-blk disk found by serial or
//! by virtio-mmio address. On the host the "disk" is a loop device holding
//! an ext4 image, and the agent reads a fake sysfs tree that places it on a
//! virtio-mmio device (a virtio-fs mount needs a VM; its request checks
//! are unit tests).

use microvm_proto::agent::v1 as api;
use microvm_tests::agent::{rootfs, spec, AgentOptions, AgentUnderTest};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Code;

const SERIAL: &str = "vol-1";
const MMIO_ADDRESS: u64 = 0xfeb0_0e00;

fn ok<T>(agent: &AgentUnderTest, result: Result<T, tonic::Status>) -> T {
    result.unwrap_or_else(|status| panic!("{status:?}\nagent log:\n{}", agent.log_text()))
}

/// A loop device detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    /// An ext4 image made from `content` (mkfs.ext4 -d), on a loop device.
    fn with_ext4(image: &Path, content: &Path) -> Self {
        let status = Command::new("truncate")
            .args(["-s", "16M"])
            .arg(image)
            .status()
            .expect("truncate");
        assert!(status.success());
        let output = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(content)
            .arg(image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ))
    }

    fn name(&self) -> String {
        self.0
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// sysfs/block/<name> → devices/platform/<addr>.virtio_mmio/virtio0/block/<name>, with a serial.
fn fake_sysfs(root: &Path, device_name: &str) {
    let device = root.join(format!(
        "devices/platform/{MMIO_ADDRESS:x}.virtio_mmio/virtio0/block/{device_name}"
    ));
    std::fs::create_dir_all(&device).expect("fake sysfs device");
    std::fs::write(device.join("serial"), SERIAL).expect("serial");
    std::fs::create_dir_all(root.join("block")).expect("fake sysfs block");
    std::os::unix::fs::symlink(
        format!("../devices/platform/{MMIO_ADDRESS:x}.virtio_mmio/virtio0/block/{device_name}"),
        root.join("block").join(device_name),
    )
    .expect("block link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_devices_mount_by_serial_and_by_mmio_address() {
    let scratch = microvm_tests::harness::TempDir::new("disk");
    let content = scratch.join("content");
    std::fs::create_dir_all(&content).expect("content dir");
    std::fs::write(content.join("hello.txt"), "from the disk\n").expect("content");
    let disk = LoopDevice::with_ext4(&scratch.join("disk.img"), &content);
    let sysfs = scratch.join("sys");
    fake_sysfs(&sysfs, &disk.name());

    let agent = AgentUnderTest::start_with(
        "storage",
        AgentOptions {
            extra_args: vec!["--sysfs".into(), sysfs.display().to_string()],
            ..AgentOptions::default()
        },
    );
    let rootfs = rootfs(&agent.dir);
    let mut client = agent.client().await;
    let target = agent.dir.join("volumes/data");
    let mount = |source| api::MountStorageRequest {
        source: Some(source),
        target: target.display().to_string(),
        fstype: "ext4".into(),
        options: vec!["ro".into(), "nodev".into()],
    };
    let response = ok(
        &agent,
        client
            .storage
            .mount_storage(mount(api::mount_storage_request::Source::BlockSerial(
                SERIAL.into(),
            )))
            .await,
    )
    .into_inner();
    assert_eq!(Path::new(&response.source), disk.0);
    let seen = agent.nsenter(
        &["mount"],
        &["cat", &target.join("hello.txt").display().to_string()],
    );
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "from the disk\n");
    // Mounted in the agent's namespace only, never the host's.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!host_mounts.contains(&target.display().to_string()));

    // A container gets it as a volume.
    let mut with_volume = spec(&rootfs, &["cat", "/data/hello.txt"]);
    with_volume["mounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"destination": "/data", "type": "bind", "source": target, "options": ["rbind", "ro"]}));
    let output = ok(&agent, client.run("c1", &with_volume).await);
    assert_eq!(
        output.stdout_text(),
        "from the disk\n",
        "{}",
        output.stderr_text()
    );

    let again = client
        .storage
        .mount_storage(mount(api::mount_storage_request::Source::BlockSerial(
            SERIAL.into(),
        )))
        .await
        .expect_err("already mounted");
    assert_eq!(again.code(), Code::AlreadyExists);
    ok(
        &agent,
        client
            .storage
            .unmount_storage(api::UnmountStorageRequest {
                target: target.display().to_string(),
            })
            .await,
    );
    let gone = client
        .storage
        .unmount_storage(api::UnmountStorageRequest {
            target: target.display().to_string(),
        })
        .await
        .expect_err("not mounted any more");
    assert_eq!(gone.code(), Code::NotFound);

    // The same disk by its virtio-mmio address.
    let response = ok(
        &agent,
        client
            .storage
            .mount_storage(mount(api::mount_storage_request::Source::BlockMmioAddress(
                MMIO_ADDRESS,
            )))
            .await,
    )
    .into_inner();
    assert_eq!(Path::new(&response.source), disk.0);
    ok(
        &agent,
        client
            .storage
            .unmount_storage(api::UnmountStorageRequest {
                target: target.display().to_string(),
            })
            .await,
    );

    // Unknown disks are named in NOT_FOUND.
    let unknown = client
        .storage
        .mount_storage(mount(api::mount_storage_request::Source::BlockSerial(
            "nope".into(),
        )))
        .await
        .expect_err("no such serial");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("nope"), "{unknown:?}");
    let unknown = client
        .storage
        .mount_storage(mount(api::mount_storage_request::Source::BlockMmioAddress(
            0x1000,
        )))
        .await
        .expect_err("no such address");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("0x1000"), "{unknown:?}");
    // A wrong filesystem type fails the mount itself, by name.
    let mut wrong = mount(api::mount_storage_request::Source::BlockSerial(
        SERIAL.into(),
    ));
    wrong.fstype = "xfs".into();
    let wrong = client
        .storage
        .mount_storage(wrong)
        .await
        .expect_err("not xfs");
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(wrong.message().contains("xfs"), "{wrong:?}");
    drop(agent);
}
