output "name" {
  description = "Name of the model-cache bucket."
  value       = aws_s3_bucket.this.id
}

output "arn" {
  description = "ARN of the model-cache bucket."
  value       = aws_s3_bucket.this.arn
}
