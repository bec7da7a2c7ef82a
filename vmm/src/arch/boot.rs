//! Loading the kernel, initrd and command line, and writing the boot
//! parameters the chosen protocol expects.
//!
//! An ELF `vmlinux` with a PVH note boots through PVH (no zero page, no
//! page tables: the fastest path). Otherwise — a bzImage, or an ELF without
//! the note — the 64-bit boot protocol is used with a zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    XEN_HVM_MEMMAP_TYPE_RAM, XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry,
    hvm_start_info,
};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIMEM_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MODLIST_ADDR,
    VIRTIO_MMIO_SIZE, ZERO_PAGE_ADDR, e820_ram, low_ram_end,
};
use super::regs::BootProtocol;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The kernel is in no format we load.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(String),
    /// The kernel cannot be loaded into guest memory.
    #[error("cannot load kernel {0}")]
    LoadKernel(String, #[source] linux_loader::loader::Error),
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {0}")]
    OpenInitrd(String, #[source] std::io::Error),
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooBig {
        /// Its path.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// The initrd cannot be copied into guest memory.
    #[error("cannot copy initrd {0} into guest memory")]
    LoadInitrd(String, #[source] vm_memory::GuestMemoryError),
    /// The command line is invalid.
    #[error("kernel command line is too long or invalid (at most {CMDLINE_MAX_SIZE} bytes)")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line cannot be written.
    #[error("cannot write the command line into guest memory")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// The boot parameters cannot be written.
    #[error("cannot write boot parameters into guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The MP table cannot be built.
    #[error("cannot build the MP table")]
    MpTable(#[source] super::mptable::MpTableError),
    /// A boot structure cannot be written.
    #[error("cannot write {0} into guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Where the kernel is entered and how.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub(crate) protocol: BootProtocol,
    pub(crate) entry: u64,
}

/// The initrd's place in guest memory.
#[derive(Clone, Copy, Debug)]
struct Initrd {
    addr: u64,
    size: u64,
}

/// Builds a command line: the user's, then a `virtio_mmio.device=` entry for
/// each virtio device, given as (MMIO base, interrupt line).
pub fn cmdline(base: &str, virtio_devices: &[(u64, u32)]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !base.trim().is_empty() {
        cmdline
            .insert_str(base.trim())
            .map_err(BootError::Cmdline)?;
    }
    for &(addr, irq) in virtio_devices {
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(addr), irq, None)
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// A file the VMM opened before confining itself, with the name its
/// messages use.
#[derive(Debug)]
pub struct NamedFile {
    pub(crate) file: File,
    pub(crate) name: String,
}

impl NamedFile {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
            name: path.display().to_string(),
        })
    }
}

/// Loads the kernel, the initrd and the command line and writes the boot
/// parameters. Returns the entry point for the bootstrap vCPU.
pub fn load_guest(
    memory: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &mut NamedFile,
    initrd: Option<&mut NamedFile>,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let kernel_name = kernel.name.clone();
    let file = &mut kernel.file;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .map_err(|e| BootError::OpenKernel(kernel_name.clone(), e))?;
    let highmem = Some(GuestAddress(HIMEM_START));
    let loaded = if magic == *b"\x7fELF" {
        Elf::load(memory, None, file, highmem)
    } else {
        BzImage::load(memory, None, file, highmem)
    }
    .map_err(|e| match e {
        linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        ) => BootError::KernelFormat(kernel_name.clone()),
        e => BootError::LoadKernel(kernel_name.clone(), e),
    })?;

    let initrd = match initrd {
        Some(file) => Some(load_initrd(memory, mem_bytes, loaded.kernel_end, file)?),
        None => None,
    };
    load_cmdline(memory, GuestAddress(CMDLINE_ADDR), cmdline).map_err(BootError::LoadCmdline)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();

    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_info(memory, mem_bytes, initrd)?;
            Ok(BootEntry {
                protocol: BootProtocol::Pvh,
                entry: entry.0,
            })
        }
        _ => {
            let mut params = boot_params::default();
            if let Some(header) = loaded.setup_header {
                params.hdr = header;
            } else {
                params.hdr.boot_flag = 0xaa55;
                params.hdr.header = 0x5372_6448; // "HdrS"
                params.hdr.kernel_alignment = 0x0100_0000;
            }
            params.hdr.type_of_loader = 0xff;
            params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_ADDR).unwrap_or(0);
            params.hdr.cmdline_size = u32::try_from(cmdline_size).unwrap_or(0);
            if let Some(initrd) = initrd {
                params.hdr.ramdisk_image = u32::try_from(initrd.addr).unwrap_or(0);
                params.hdr.ramdisk_size = u32::try_from(initrd.size).unwrap_or(0);
            }
            let ram = e820_ram(mem_bytes);
            for (slot, range) in params.e820_table.iter_mut().zip(&ram) {
                *slot = boot_e820_entry {
                    addr: range.start,
                    size: range.len,
                    r#type: 1,
                };
            }
            params.e820_entries = u8::try_from(ram.len()).unwrap_or(0);
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
                memory,
            )
            .map_err(BootError::BootParams)?;
            // A bzImage's 64-bit entry is 0x200 past its load address.
            let entry = if loaded.setup_header.is_some() {
                loaded.kernel_load.0 + 0x200
            } else {
                loaded.kernel_load.0
            };
            Ok(BootEntry {
                protocol: BootProtocol::Linux64,
                entry,
            })
        }
    }
}

/// Copies the initrd to the top of low RAM, page-aligned, above the kernel.
fn load_initrd(
    memory: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    initrd: &mut NamedFile,
) -> Result<Initrd, BootError> {
    let name = initrd.name.clone();
    let file = &mut initrd.file;
    let size = file
        .metadata()
        .map_err(|e| BootError::OpenInitrd(name.clone(), e))?
        .len();
    let too_big = || BootError::InitrdTooBig {
        path: name.clone(),
        size,
    };
    let addr = low_ram_end(mem_bytes)
        .checked_sub(size)
        .ok_or_else(too_big)?
        & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    let len = usize::try_from(size).map_err(|_| too_big())?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|e| BootError::LoadInitrd(name, e))?;
    Ok(Initrd { addr, size })
}

/// Writes the PVH start info, its memory map and the initrd module entry.
fn write_pvh_info(
    memory: &GuestMemoryMmap,
    mem_bytes: u64,
    initrd: Option<Initrd>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_ram(mem_bytes)
        .into_iter()
        .map(|range| hvm_memmap_table_entry {
            addr: range.start,
            size: range.len,
            type_: XEN_HVM_MEMMAP_TYPE_RAM,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len()).unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: initrd.addr,
                size: initrd.size,
                ..Default::default()
            }],
            GuestAddress(PVH_MODLIST_ADDR),
        );
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, memory)
        .map_err(BootError::BootParams)
}

/// Writes the MP table, GDT and (for the 64-bit protocol) page tables.
pub fn write_arch_tables(
    memory: &GuestMemoryMmap,
    vcpus: u8,
    protocol: BootProtocol,
) -> Result<(), BootError> {
    use super::layout::{GDT_ADDR, MPTABLE_ADDR};
    let mptable = super::mptable::build(vcpus, u32::try_from(MPTABLE_ADDR).unwrap_or(0))
        .map_err(BootError::MpTable)?;
    memory
        .write_slice(&mptable, GuestAddress(MPTABLE_ADDR))
        .map_err(|e| BootError::Write("the MP table", e))?;
    memory
        .write_slice(&super::regs::gdt_bytes(), GuestAddress(GDT_ADDR))
        .map_err(|e| BootError::Write("the GDT", e))?;
    if protocol == BootProtocol::Linux64 {
        for (addr, bytes) in super::regs::page_tables() {
            memory
                .write_slice(&bytes, GuestAddress(addr))
                .map_err(|e| BootError::Write("the page tables", e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_devices_are_announced_after_the_users_command_line() {
        let line = cmdline(
            " console=ttyS0 quiet ",
            &[(0xd000_0000, 5), (0xd000_1000, 6)],
        )
        .unwrap()
        .as_cstring()
        .unwrap();
        assert_eq!(
            line.to_str().unwrap(),
            "console=ttyS0 quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
