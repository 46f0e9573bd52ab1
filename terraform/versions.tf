terraform {
  # 1.10: the S3 backend locks with a lock file (use_lockfile) and needs no DynamoDB table;
  # 1.9: validation rules that compare variables; 1.7: mock providers in tests/
  required_version = ">= 1.10.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # written and tested against 5.x (5.73: ElastiCache's valkey engine); 6.0 reworked
      # per-resource regions and removed arguments
      version = ">= 5.73.0, < 6.0.0"
    }
  }
}
