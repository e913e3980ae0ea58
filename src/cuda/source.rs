//! Kernel sources embedded in the binary, and the text NVRTC compiles.
//!
//! NVRTC cannot read `kernels/` once the crate is installed, so each `.cu` file is compiled
//! into the binary and `common.cuh` is spliced in place of its `#include "common.cuh"` line,
//! with `#line` markers so compiler messages name the original file and line.

/// One kernel source file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KernelSource {
    /// File name under `kernels/`, also the module key of the runtimes.
    pub name: &'static str,
    /// File contents.
    pub text: &'static str,
}

/// `kernels/common.cuh`.
pub(crate) const COMMON: &str = include_str!("../../kernels/common.cuh");

/// `kernels/token_logps.cu`: forward and backward over the logits.
pub(crate) const TOKEN_LOGPS: KernelSource = KernelSource {
    name: "token_logps.cu",
    text: include_str!("../../kernels/token_logps.cu"),
};

/// `kernels/dpo.cu`: the pair step.
pub(crate) const DPO: KernelSource = KernelSource {
    name: "dpo.cu",
    text: include_str!("../../kernels/dpo.cu"),
};

/// Every kernel source, in the order the check reports them.
pub(crate) const MODULES: [KernelSource; 2] = [TOKEN_LOGPS, DPO];

/// The line each kernel source uses to include the shared header.
const COMMON_INCLUDE: &str = "#include \"common.cuh\"";

/// Returns the source of `module` with `common.cuh` spliced in place of its include line.
/// A source without that line is returned unchanged.
pub(crate) fn nvrtc_source(module: &KernelSource) -> String {
    let mut out = String::with_capacity(COMMON.len() + module.text.len() + 128);
    let mut spliced = false;
    for (index, line) in module.text.lines().enumerate() {
        if !spliced && line.trim() == COMMON_INCLUDE {
            out.push_str("#line 1 \"common.cuh\"\n");
            out.push_str(COMMON);
            if !COMMON.ends_with('\n') {
                out.push('\n');
            }
            // `#line N` names the number of the line that follows it.
            out.push_str(&format!("#line {} \"{}\"\n", index + 2, module.name));
            spliced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Returns the kernel source named `name` (`token_logps.cu`, `dpo.cu`).
pub(crate) fn module_by_name(name: &str) -> Option<KernelSource> {
    MODULES.iter().copied().find(|module| module.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_the_include_line() {
        for module in MODULES {
            let text = nvrtc_source(&module);
            let includes = text
                .lines()
                .filter(|line| line.trim() == COMMON_INCLUDE)
                .count();
            assert_eq!(includes, 0, "{} still includes common.cuh", module.name);
            assert!(
                text.contains("struct TokenLogpsFwdParams"),
                "{}",
                module.name
            );
            assert!(text.contains("#line 1 \"common.cuh\""), "{}", module.name);
        }
    }

    #[test]
    fn splice_keeps_line_numbers_of_the_source() {
        let module = KernelSource {
            name: "probe.cu",
            text: "// first\n#include \"common.cuh\"\nint third;\n",
        };
        let text = nvrtc_source(&module);
        let after = text.split("#line 3 \"probe.cu\"\n").nth(1);
        assert_eq!(after, Some("int third;\n"));
        assert!(text.starts_with("// first\n#line 1 \"common.cuh\"\n"));
    }

    #[test]
    fn modules_are_found_by_name() {
        assert_eq!(module_by_name("dpo.cu").map(|m| m.name), Some("dpo.cu"));
        assert!(module_by_name("missing.cu").is_none());
    }
}
