terraform {
  # 1.9: validation rules may refer to other variables
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.73: the replication group's engine may be valkey; 6.0 reworked per-resource regions
      version = ">= 5.73.0, < 6.0.0"
    }
  }
}
