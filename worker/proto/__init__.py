"""Code generated from ``protos/job.proto`` by ``make proto``; do not edit."""
