terraform {
  # 1.9: validation rules may refer to other variables
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # written and tested against 5.x; 6.0 reworked per-resource regions and removed arguments
      version = ">= 5.70.0, < 6.0.0"
    }
  }
}
