//! Build script: rebuilds when a kernel source changes (the sources are embedded with
//! `include_str!`), and compile-checks them with `nvcc` when one is on PATH. A machine
//! without the CUDA toolkit builds the crate all the same. With the `emulator` feature it also
//! compiles the kernel sources as host C++ under the CPU model of CUDA execution in `emu/`
//! (see `emu/README.md`). Only that feature needs a C++17 compiler.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=emu");
    #[cfg(feature = "emulator")]
    emulator::build(Path::new(env!("CARGO_MANIFEST_DIR")));
    let kernels = Path::new("kernels");
    let Ok(entries) = std::fs::read_dir(kernels) else {
        return;
    };
    let mut sources = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.extension().is_some_and(|ext| ext == "cu") {
            sources.push(path);
        }
    }
    sources.sort();
    check_with_nvcc(&sources);
}

/// Compiles each `.cu` for sm_80 with `nvcc` if it is on PATH and turns its errors into
/// cargo warnings. NVRTC compiles the kernels again at run time, which is where errors stop
/// the program.
// NOTE: never run on a machine with nvcc; NVRTC is the checked path (`.ci/kernels`).
fn check_with_nvcc(sources: &[std::path::PathBuf]) {
    let Ok(out_dir) = std::env::var("OUT_DIR") else {
        return;
    };
    let nvcc_found = Command::new("nvcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !nvcc_found {
        return;
    }
    for source in sources {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel");
        let output = Command::new("nvcc")
            .args(["-std=c++17", "-arch=sm_80", "-cubin", "-I", "kernels", "-o"])
            .arg(Path::new(&out_dir).join(format!("{stem}.cubin")))
            .arg(source)
            .output();
        match output {
            Ok(result) if result.status.success() => {}
            Ok(result) => {
                for line in String::from_utf8_lossy(&result.stderr).lines() {
                    println!("cargo:warning=nvcc {}: {line}", source.display());
                }
            }
            Err(err) => println!(
                "cargo:warning=nvcc could not run on {}: {err}",
                source.display()
            ),
        }
    }
}

#[cfg(feature = "emulator")]
mod emulator {
    //! Generates one translation unit per kernel module, with a kernel table, and compiles
    //! them with `emu/runtime.cpp` into the static library `dpo_emu`.
    //!
    //! Per module (`kernels/NAME.cu`, plus the test-only `emu/tests/NAME.cu`):
    //! 1. Write a unit that includes `emu/cuda_emu.h`, then inside `namespace emu_module_NAME`
    //!    `kernels/common.cuh` (as NVRTC gets it prepended; test modules skip it) and the
    //!    `.cu` file. The namespace keeps each module's copy of the common helpers apart, as
    //!    separate NVRTC modules are.
    //! 2. Preprocess it with the C++ compiler, so kernels and shared arrays that macros
    //!    generate are seen too.
    //! 3. Rewrite the markers that `__global__` and `__shared__` expand to (see [`rewrite`]),
    //!    collecting every `extern "C"` kernel and its parameter type.
    //! 4. Append a trampoline per kernel (parameter bytes to struct, then the call) and the
    //!    module's kernel table.

    use std::fmt::Write as _;
    use std::fs;
    use std::path::{Path, PathBuf};

    /// One `extern "C" __global__ void NAME(PARAMS p)` entry.
    struct Kernel {
        name: String,
        /// Parameter type as written, or `None` for a kernel without parameters.
        params: Option<String>,
    }

    pub fn build(root: &Path) {
        println!("cargo:rerun-if-env-changed=CXX");
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let gen_dir = out_dir.join("emu");
        fs::create_dir_all(&gen_dir).expect("create OUT_DIR/emu");
        let emu_dir = root.join("emu");
        let kernels_dir = root.join("kernels");
        let common = kernels_dir.join("common.cuh");

        let mut modules: Vec<(PathBuf, bool)> = Vec::new();
        for (dir, with_common) in [(&kernels_dir, true), (&emu_dir.join("tests"), false)] {
            for path in cu_files(dir) {
                modules.push((path, with_common));
            }
        }

        let mut build = base_build(&emu_dir, &kernels_dir);
        build.file(emu_dir.join("runtime.cpp"));
        let mut registry = String::from("#include \"cuda_emu.h\"\n\n");
        let mut tables = Vec::new();
        for (source, with_common) in &modules {
            let stem = source
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("kernel file names are UTF-8");
            let module = format!("{stem}.cu");
            let ident = stem.replace(|c: char| !c.is_ascii_alphanumeric(), "_");

            // 1. The unit to preprocess.
            let mut unit = String::from("#include \"cuda_emu.h\"\n");
            writeln!(unit, "namespace emu_module_{ident} {{").unwrap();
            if *with_common && common.exists() {
                writeln!(unit, "#include \"{}\"", common.display()).unwrap();
            }
            writeln!(unit, "#include \"{}\"", source.display()).unwrap();
            unit.push_str("}\n");
            let unit_path = gen_dir.join(format!("{ident}.in.cpp"));
            fs::write(&unit_path, unit).expect("write the unit");

            // 2. Preprocess.
            let mut expand = base_build(&emu_dir, &kernels_dir);
            expand.file(&unit_path);
            let expanded = match expand.try_expand() {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) => panic!(
                    "preprocessing {} for the emulator failed: {e}. The `emulator` feature \
                     compiles the kernels with a host C++17 compiler: install g++ (or set CXX), \
                     or run `cargo test` without `--features emulator`",
                    source.display()
                ),
            };

            // 3. Rewrite the markers and collect the kernels.
            let (mut text, kernels) = match rewrite(&expanded) {
                Ok(result) => result,
                Err(e) => panic!("{}: {e}", source.display()),
            };

            // 4. Trampolines and the kernel table.
            text.push_str(&trampolines(&ident, &module, &kernels));
            let final_path = gen_dir.join(format!("{ident}.cpp"));
            fs::write(&final_path, text).expect("write the rewritten unit");
            build.file(&final_path);
            if !kernels.is_empty() {
                writeln!(
                    registry,
                    "namespace emu_tables {{ extern const ::emu::KernelEntry {ident}[]; }}"
                )
                .unwrap();
                tables.push((ident, kernels.len()));
            }
        }

        registry.push_str("\nnamespace emu {\nextern const KernelTable kernel_tables[];\n");
        registry.push_str("extern const size_t kernel_table_count;\n");
        registry.push_str("const KernelTable kernel_tables[] = {\n");
        for (ident, count) in &tables {
            writeln!(registry, "    {{emu_tables::{ident}, {count}}},").unwrap();
        }
        if tables.is_empty() {
            registry.push_str("    {nullptr, 0},\n");
        }
        writeln!(
            registry,
            "}};\nconst size_t kernel_table_count = {};\n}} // namespace emu",
            tables.len()
        )
        .unwrap();
        let registry_path = gen_dir.join("registry.cpp");
        fs::write(&registry_path, registry).expect("write the registry");
        build.file(&registry_path);
        build.compile("dpo_emu");
    }

    /// Returns the `.cu` files of `dir`, sorted; none when the folder does not exist.
    fn cu_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "cu"))
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        files
    }

    /// Compiler settings shared by preprocessing and compiling. `-O2` even in test builds,
    /// since the kernels run thousands of threads per launch. Strict aliasing is off because
    /// kernels reinterpret buffers as packs, which CUDA allows. FMA contraction is off, so
    /// results do not depend on the host CPU. `#pragma unroll` has no g++ meaning and is ignored.
    fn base_build(emu_dir: &Path, kernels_dir: &Path) -> cc::Build {
        let mut build = cc::Build::new();
        build
            .cpp(true)
            .std("c++17")
            .opt_level(2)
            .include(emu_dir)
            .include(emu_dir.join("include"))
            .include(kernels_dir)
            .flag("-pthread")
            .flag("-fno-strict-aliasing")
            .flag_if_supported("-ffp-contract=off")
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-unknown-pragmas");
        build
    }

    /// Rewrites the preprocessed unit and returns it with the `extern "C"` kernels found:
    /// - `extern __emu_shared__ T name[];` becomes `T* const name = (T*)dynamic_shared();`
    ///   (attributes dropped), since every dynamic shared array starts at the same address;
    /// - any other `__emu_shared__` becomes `static` in section `emu_shared`, one variable per
    ///   program that the runtime poisons before each block;
    /// - `__emu_global__` is removed; when `extern "C"` precedes it, the kernel's name and
    ///   parameter type are recorded.
    fn rewrite(text: &str) -> Result<(String, Vec<Kernel>), String> {
        let mut out = String::with_capacity(text.len());
        let mut kernels = Vec::new();
        let mut pos = 0;
        while let Some((start, marker)) = next_marker(text, pos) {
            let end = start + marker.len();
            let before = text[pos..start].trim_end();
            match marker {
                "__emu_shared__"
                    if before.ends_with("extern") && is_word_end(text, pos, before) =>
                {
                    let extern_at = pos + before.len() - "extern".len();
                    let semicolon = text[end..]
                        .find(';')
                        .map(|i| end + i)
                        .ok_or("`extern __shared__` declaration without `;`")?;
                    out.push_str(&text[pos..extern_at]);
                    out.push_str(&dynamic_shared(&text[end..semicolon])?);
                    pos = semicolon + 1;
                }
                "__emu_shared__" => {
                    out.push_str(&text[pos..start]);
                    if !ends_with_word(before, "static") {
                        out.push_str("static ");
                    }
                    out.push_str("__attribute__((section(\"emu_shared\")))");
                    pos = end;
                }
                _ => {
                    out.push_str(&text[pos..start]);
                    if before.ends_with("extern \"C\"") {
                        let kernel = parse_kernel(&text[end..])?;
                        // A prototype and its definition name the same kernel.
                        if !kernels.iter().any(|k: &Kernel| k.name == kernel.name) {
                            kernels.push(kernel);
                        }
                    }
                    pos = end;
                }
            }
        }
        out.push_str(&text[pos..]);
        Ok((out, kernels))
    }

    /// Returns the next `__emu_shared__` or `__emu_global__` identifier at or after `from`.
    fn next_marker(text: &str, from: usize) -> Option<(usize, &'static str)> {
        let mut search = from;
        while let Some(i) = text[search..].find("__emu_") {
            let at = search + i;
            for marker in ["__emu_shared__", "__emu_global__"] {
                if text[at..].starts_with(marker)
                    && is_boundary(text, at)
                    && !text[at + marker.len()..].starts_with(is_ident_char)
                {
                    return Some((at, marker));
                }
            }
            search = at + "__emu_".len();
        }
        None
    }

    fn is_ident_char(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_'
    }

    /// Returns whether `text[at]` starts an identifier (no identifier character before it).
    fn is_boundary(text: &str, at: usize) -> bool {
        !text[..at].ends_with(is_ident_char)
    }

    /// Returns whether `before` (a prefix of `text` from `pos`) ends with a whole word.
    fn is_word_end(text: &str, pos: usize, before: &str) -> bool {
        let word_start = pos + before.len() - "extern".len();
        is_boundary(text, word_start)
    }

    fn ends_with_word(text: &str, word: &str) -> bool {
        text.ends_with(word) && !text[..text.len() - word.len()].ends_with(is_ident_char)
    }

    /// Turns the declarator part of `extern __shared__ <decl> NAME[]` into a pointer to the
    /// dynamic shared memory.
    fn dynamic_shared(decl: &str) -> Result<String, String> {
        let decl = strip_attributes(decl);
        let decl = decl.trim();
        let bad = || format!("cannot read `extern __shared__{decl};`: expected `TYPE NAME[]`");
        let body = decl.strip_suffix(']').ok_or_else(bad)?.trim_end();
        let body = body.strip_suffix('[').ok_or_else(bad)?.trim_end();
        let name_start = body.rfind(|c: char| !is_ident_char(c)).map_or(0, |i| i + 1);
        let (ty, name) = (body[..name_start].trim(), &body[name_start..]);
        if ty.is_empty() || name.is_empty() {
            return Err(bad());
        }
        Ok(format!(
            "{ty}* const {name} = ({ty}*)::emu::dynamic_shared();"
        ))
    }

    /// Removes `__attribute__((...))` and `alignas(...)` groups.
    fn strip_attributes(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        loop {
            let next = ["__attribute__", "alignas"]
                .iter()
                .filter_map(|k| rest.find(k).map(|i| (i, k.len())))
                .min();
            let Some((i, len)) = next else {
                out.push_str(rest);
                return out;
            };
            out.push_str(&rest[..i]);
            let after = &rest[i + len..];
            let open = after.find('(').unwrap_or(0);
            let mut depth = 0;
            let mut close = after.len();
            for (j, c) in after.char_indices().skip(open) {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            close = j + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &after[close..];
        }
    }

    /// Parses `void NAME(PARAMS)` after an `extern "C" __global__` marker.
    fn parse_kernel(text: &str) -> Result<Kernel, String> {
        let head = text.trim_start();
        let head = head
            .strip_prefix("void")
            .filter(|rest| !rest.starts_with(is_ident_char))
            .ok_or_else(|| "an extern \"C\" __global__ kernel must return void".to_string())?;
        let open = head.find('(').ok_or("kernel without a parameter list")?;
        let name = head[..open].trim().to_string();
        if name.is_empty() || !name.chars().all(is_ident_char) {
            return Err(format!(
                "cannot read the kernel name in `{}`",
                &head[..open]
            ));
        }
        let close = head[open..]
            .find(')')
            .map(|i| open + i)
            .ok_or("kernel parameter list without `)`")?;
        let list = head[open + 1..close].trim();
        if list.is_empty() || list == "void" {
            return Ok(Kernel { name, params: None });
        }
        if list.contains(',') {
            return Err(format!(
                "kernel `{name}` takes `{list}`; the emulator expects one by-value parameter \
                 struct, as the launch code passes"
            ));
        }
        let param_name_start = list.rfind(|c: char| !is_ident_char(c)).map_or(0, |i| i + 1);
        let ty = list[..param_name_start].trim();
        let ty = if ty.is_empty() { list } else { ty };
        Ok(Kernel {
            name,
            params: Some(ty.to_string()),
        })
    }

    /// Returns the trampolines and the kernel table of one module.
    fn trampolines(ident: &str, module: &str, kernels: &[Kernel]) -> String {
        let mut out = String::new();
        writeln!(out, "\nnamespace emu_module_{ident} {{").unwrap();
        for k in kernels {
            match &k.params {
                Some(ty) => {
                    writeln!(
                        out,
                        "using emu_params_{name} = std::remove_cv_t<{ty}>;\n\
                         static_assert(!std::is_reference<emu_params_{name}>::value && \
                         std::is_trivially_copyable<emu_params_{name}>::value, \
                         \"kernel parameters are passed by value and copied as bytes\");\n\
                         static void emu_run_{name}(const void* bytes) {{\n    \
                         emu_params_{name} params;\n    \
                         std::memcpy((void*)&params, bytes, sizeof params);\n    \
                         {name}(params);\n}}",
                        name = k.name
                    )
                    .unwrap();
                }
                None => writeln!(
                    out,
                    "static void emu_run_{name}(const void*) {{ {name}(); }}",
                    name = k.name
                )
                .unwrap(),
            }
        }
        writeln!(out, "}} // namespace emu_module_{ident}\n").unwrap();
        if kernels.is_empty() {
            return out;
        }
        writeln!(
            out,
            "namespace emu_tables {{\nextern const ::emu::KernelEntry {ident}[];\n\
             const ::emu::KernelEntry {ident}[] = {{"
        )
        .unwrap();
        for k in kernels {
            let (size, align) = match &k.params {
                Some(_) => (
                    format!("sizeof(emu_module_{ident}::emu_params_{})", k.name),
                    format!("alignof(emu_module_{ident}::emu_params_{})", k.name),
                ),
                None => ("0".to_string(), "1".to_string()),
            };
            writeln!(
                out,
                "    {{\"{module}\", \"{name}\", {size}, {align}, \
                 &emu_module_{ident}::emu_run_{name}}},",
                name = k.name
            )
            .unwrap();
        }
        out.push_str("};\n} // namespace emu_tables\n");
        out
    }
}
