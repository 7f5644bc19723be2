"""reports: what is measured and told about a machine or a build (doctor, bench, bench-build, gpu-report,
repro, upstream tests). Nothing here is imported by the pipeline."""
