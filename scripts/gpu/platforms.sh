# Sourced by the GPU scripts: pip's platform tags for the lent GPU hosts (CPython 3.12, x86-64).
# pip matches manylinux_2_N exactly, so every N a wanted wheel may carry is listed.
platforms=()
for n in 5 17 24 26 27 28 31 34 35 39; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
